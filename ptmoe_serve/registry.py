"""Adapters resident on the routing device: names -> slots in per-shape banks.

All adapters of one shape (experts, prompt length, rank) live in one `AdapterBank`: a few stacked
tensors with a slot per adapter, so a routing step gathers its rows in one indexing op. A new
shape starts with one slot; banks grow by doubling, and a bank goes when its last adapter does.
A slot still referenced by a request is freed only once that request is done, so replacing or
unloading an adapter never changes a request already accepted."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptmoe_serve.adapter import AdapterConfig, AdapterError, PtMoeAdapter, validate_name
from ptmoe_serve.routing import Routing, route_batch



class AdapterExists(AdapterError):
    """The name is taken and replacing was not asked for."""


class AdapterNotFound(KeyError):
    pass


@dataclass(frozen=True)
class BankShape:
    num_experts: int
    prompt_length: int
    rank: int

    @staticmethod
    def of(config: AdapterConfig) -> BankShape:
        return BankShape(config.num_experts, config.prompt_length, config.rank)


class AdapterBank:
    """Stacked float32 tensors of all resident adapters of one shape, one slot each."""

    def __init__(self, shape: BankShape, hidden_size: int, device: torch.device):
        self.shape = shape
        self.hidden_size = hidden_size
        self.device = device
        self._free: list[int] = []
        self._tensors = self._allocate(0)

    def _allocate(self, capacity: int) -> dict[str, torch.Tensor]:
        n, t, r, h = self.shape.num_experts, self.shape.prompt_length, self.shape.rank, self.hidden_size
        f32 = {"dtype": torch.float32, "device": self.device}
        return {
            "experts_a": torch.zeros(capacity, n, t, r, **f32),
            "shared_b": torch.zeros(capacity, r, h, **f32),
            "router_weight": torch.zeros(capacity, n, h, **f32),
            "router_bias": torch.zeros(capacity, n, **f32),
            "top_k": torch.ones(capacity, dtype=torch.long, device=self.device),
            "scale_by_probability": torch.zeros(capacity, dtype=torch.bool, device=self.device),
        }

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The bank's stacked tensors, one row per slot (read-only use)."""
        return self._tensors

    @property
    def capacity(self) -> int:
        return self._tensors["top_k"].shape[0]

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self._tensors.values())

    def _grow(self, capacity: int) -> None:
        old, old_capacity = self._tensors, self.capacity
        self._tensors = self._allocate(capacity)
        for key, tensor in old.items():
            self._tensors[key][:old_capacity] = tensor
        # Highest first, so `put` pops the lowest free slot.
        self._free.extend(range(capacity - 1, old_capacity - 1, -1))

    def reserve(self, count: int) -> None:
        """Make room for `count` more adapters in one allocation (a bulk load then never
        copies the bank, and takes no more memory than it needs)."""
        if len(self._free) < count:
            self._grow(self.capacity + count - len(self._free))

    def put(self, adapter: PtMoeAdapter) -> int:
        """Write the adapter into a free slot and return the slot."""
        if not self._free:
            self._grow(max(1, 2 * self.capacity))
        slot = self._free.pop()
        if not self.slots_only:
            self._write_rows(torch.tensor([slot]), bank_rows([adapter]))
        return slot

    def write_rows(self, slots: torch.Tensor, rows: dict[str, torch.Tensor],
                   capacity: int = 0) -> None:
        """Write `bank_rows` into these slots, growing the bank to at least `capacity` slots
        and to hold them: how a bank that mirrors another (in the engine's workers) follows
        the slots and size chosen there."""
        needed = max(capacity, int(slots.max()) + 1)
        if needed > self.capacity:
            self._grow(needed)
        taken = set(slots.tolist())
        self._free = [slot for slot in self._free if slot not in taken]
        self._write_rows(slots, rows)

    @property
    def slots_only(self) -> bool:
        """A bank on the meta device keeps slots, no tensors (its adapters live elsewhere)."""
        return self.device.type == "meta"

    def _write_rows(self, slots: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        index = slots.to(self.device)
        for key, tensor in self._tensors.items():
            tensor.index_copy_(0, index, rows[key].to(self.device, tensor.dtype))

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def route(self, slots: torch.Tensor, mean_embeddings: torch.Tensor) -> Routing:
        """Soft prompts for a batch of requests, each naming its adapter by slot."""
        rows = {key: tensor.index_select(0, slots) for key, tensor in self._tensors.items()}
        return route_batch(mean_embeddings=mean_embeddings, **rows)


def bank_rows(adapters: Sequence[PtMoeAdapter]) -> dict[str, torch.Tensor]:
    """Adapters of one shape as rows of a bank's tensors, one row per adapter."""
    # One adapter's rows are views: loading one copies its tensors once, into the bank.
    stack = (lambda ts: ts[0].unsqueeze(0)) if len(adapters) == 1 else torch.stack
    return {
        "experts_a": stack([a.experts_a for a in adapters]),
        "shared_b": stack([a.shared_b for a in adapters]),
        "router_weight": stack([a.router_weight for a in adapters]),
        "router_bias": stack([a.router_bias for a in adapters]),
        "top_k": torch.tensor([a.config.top_k for a in adapters]),
        "scale_by_probability": torch.tensor(
            [a.config.router_scaling == "probability" for a in adapters]),
    }


@dataclass(eq=False)
class AdapterEntry:
    """A loaded adapter as requests see it. A replaced adapter gets a new entry."""

    name: str
    adapter: PtMoeAdapter
    bank: AdapterBank
    slot: int
    version: int
    source: Path | None
    loaded_at: float = field(default_factory=time.time)
    requests_served: int = 0
    pending: int = 0  # routing steps queued that still read this slot
    retired: bool = False

    def describe(self) -> dict:
        config = self.adapter.config
        return {
            "name": self.name,
            "version": self.version,
            "num_experts": config.num_experts,
            "prompt_length": config.prompt_length,
            "rank": config.rank,
            "top_k": config.top_k,
            "router_scaling": config.router_scaling,
            "hidden_size": config.hidden_size,
            "base_model_name_or_path": config.base_model_name_or_path,
            "num_parameters": self.adapter.num_parameters,
            "bytes_on_device": self.bank.bytes_per_slot,
            "loaded_at": int(self.loaded_at),
            "requests_served": self.requests_served,
        }


class AdapterRegistry:
    def __init__(self, hidden_size: int, max_model_len: int, device: torch.device,
                 reserved_names: frozenset[str] | set[str] = frozenset(),
                 max_prompt_length: int | None = None,
                 on_bank_dropped: Callable[[BankShape], None] = lambda shape: None):
        self.hidden_size = hidden_size
        self.max_prompt_length = max_prompt_length
        self.reserved_names = frozenset(reserved_names)
        self.max_model_len = max_model_len
        self.device = device
        self._entries: dict[str, AdapterEntry] = {}
        self._banks: dict[BankShape, AdapterBank] = {}
        # Told when a shape's bank goes (the engine route drops the workers' copy too).
        self.on_bank_dropped = on_bank_dropped
        self._versions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> AdapterEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFound(name) from None

    def check_compatible(self, config: AdapterConfig) -> None:
        if config.hidden_size != self.hidden_size:
            raise AdapterError(
                f"adapter hidden_size is {config.hidden_size}; the base model's is {self.hidden_size}"
            )
        if config.prompt_length >= self.max_model_len:
            raise AdapterError(
                f"prompt_length {config.prompt_length} leaves no room in the context of "
                f"{self.max_model_len} tokens"
            )
        if self.max_prompt_length is not None and config.prompt_length > self.max_prompt_length:
            raise AdapterError(
                f"prompt_length {config.prompt_length} is over this server's limit of "
                f"{self.max_prompt_length} (--max-soft-prompt-length)")

    def check_name(self, name: str) -> None:
        validate_name(name)
        if name in self.reserved_names:
            raise AdapterExists(f"{name!r} is reserved (the base model's name, or a chat "
                                "content-part type that vLLM matches adapter names against); "
                                "choose another adapter name")

    def add(self, name: str, adapter: PtMoeAdapter, *, replace: bool = False,
            source: Path | None = None) -> AdapterEntry:
        self.check_name(name)
        self.check_compatible(adapter.config)
        old = self._entries.get(name)
        if old is not None and not replace:
            raise AdapterExists(f"adapter {name!r} is already loaded; pass replace to swap it")
        bank = self._bank(BankShape.of(adapter.config))
        self._versions += 1
        entry = AdapterEntry(name, adapter, bank, bank.put(adapter), self._versions, source)
        self._entries[name] = entry
        if old is not None:
            self._retire(old)
        return entry

    def reserve(self, configs: Iterable[AdapterConfig]) -> None:
        """Make room for these adapters, one allocation per bank, before loading them all."""
        counts = Counter(BankShape.of(config) for config in configs)
        for shape, count in counts.items():
            self._bank(shape).reserve(count)

    def _bank(self, shape: BankShape) -> AdapterBank:
        bank = self._banks.get(shape)
        if bank is None:
            bank = self._banks[shape] = AdapterBank(shape, self.hidden_size, self.device)
        return bank

    def remove(self, name: str) -> AdapterEntry:
        entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterNotFound(name)
        self._retire(entry)
        return entry

    def drop_empty_banks(self) -> None:
        """Free every bank no adapter uses (after a bulk load whose reservations some folders
        failed to fill, and as adapters go)."""
        for shape, bank in list(self._banks.items()):
            if bank.in_use == 0:
                del self._banks[shape]
                self.on_bank_dropped(shape)

    @property
    def banks(self) -> dict[BankShape, AdapterBank]:
        return dict(self._banks)

    @property
    def bank_bytes(self) -> int:
        return sum(bank.capacity * bank.bytes_per_slot for bank in self._banks.values())

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.pending == 0:
            self._free(entry)

    def _free(self, entry: AdapterEntry) -> None:
        entry.bank.free(entry.slot)
        if entry.bank.in_use == 0 and self._banks.get(entry.bank.shape) is entry.bank:
            del self._banks[entry.bank.shape]
            self.on_bank_dropped(entry.bank.shape)

    def acquire(self, entry: AdapterEntry) -> None:
        entry.pending += 1

    def release(self, entry: AdapterEntry) -> None:
        entry.pending -= 1
        if entry.retired and entry.pending == 0:
            self._free(entry)
