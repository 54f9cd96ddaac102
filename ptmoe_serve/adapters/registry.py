"""Adapters resident on the routing device: names -> entries -> slots in per-shape banks
(bank.py), in the order they were last used. A bank goes when its last adapter does. A slot
still referenced by a request is freed only once that request is done, so replacing, unloading
or evicting an adapter never changes a request already accepted."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptmoe_serve.adapters.bank import AdapterBank, BankShape
from ptmoe_serve.adapters.config import AdapterConfig, AdapterError, validate_name
from ptmoe_serve.adapters.format import PtMoeAdapter



class AdapterExists(AdapterError):
    """The name is taken and replacing was not asked for."""


class AdapterNotFound(KeyError):
    pass


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
            "route_scope": config.route_scope,
            "hidden_size": config.hidden_size,
            "base_model_name_or_path": config.base_model_name_or_path,
            "num_parameters": self.adapter.num_parameters,
            "bytes_on_device": self.bank.bytes_per_slot,
            "slot": self.slot,
            "loaded_at": int(self.loaded_at),
            "requests_served": self.requests_served,
        }


class Hold:
    """A request's one hold on its adapter's entry, which keeps its slot from eviction and
    reuse: taken once (`AdapterRegistry.hold`, `ResidentSet.hold`), shared by what the request
    starts (`join`), and released when the last holder leaves (a response generated in the
    background outlives its HTTP request)."""

    def __init__(self, entry: AdapterEntry, release: Callable[[AdapterEntry], None]):
        self.entry = entry
        self._release = release
        self._holders = 1

    def join(self) -> bool:
        """One more holder; False if the hold has been released (take a new one)."""
        if self._holders == 0:
            return False
        self._holders += 1
        return True

    def leave(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release(self.entry)


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
        # Least recently used first.
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._banks: dict[BankShape, AdapterBank] = {}
        # Told when a shape's bank goes (the engine route drops the workers' copy too).
        self.on_bank_dropped = on_bank_dropped

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def least_recently_used(self) -> Iterator[AdapterEntry]:
        """The entries, least recently used first (not to be changed while iterated)."""
        return iter(self._entries.values())

    def get(self, name: str) -> AdapterEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFound(name) from None

    def find(self, name: str) -> AdapterEntry | None:
        return self._entries.get(name)

    def check_compatible(self, config: AdapterConfig) -> None:
        if config.hidden_size != self.hidden_size:
            raise AdapterError(f"adapter hidden_size is {config.hidden_size}; the base model's "
                               f"is {self.hidden_size}", field="hidden_size")
        if config.prompt_length >= self.max_model_len:
            raise AdapterError(f"prompt_length {config.prompt_length} leaves no room in the "
                               f"context of {self.max_model_len} tokens", field="prompt_length")
        if self.max_prompt_length is not None and config.prompt_length > self.max_prompt_length:
            raise AdapterError(
                f"prompt_length {config.prompt_length} is over this server's limit of "
                f"{self.max_prompt_length} (--max-soft-prompt-length)", field="prompt_length")

    def check_name(self, name: str) -> None:
        validate_name(name)
        if name in self.reserved_names:
            raise AdapterExists(f"{name!r} is reserved (the base model's name, or a chat "
                                "content-part type that vLLM matches adapter names against); "
                                "choose another adapter name")

    def add(self, name: str, adapter: PtMoeAdapter, *, version: int, replace: bool = False,
            source: Path | None = None) -> AdapterEntry:
        """Put `adapter` in a bank as `name`; `version` is the store's (see journal.py)."""
        self.check_name(name)
        self.check_compatible(adapter.config)
        old = self._entries.get(name)
        if old is not None and not replace:
            raise AdapterExists(f"adapter {name!r} is already loaded; pass replace to swap it")
        bank = self._bank(BankShape.of(adapter.config))
        entry = AdapterEntry(name, adapter, bank, bank.put(adapter), version, source)
        self._entries[name] = entry
        self._entries.move_to_end(name)
        if old is not None:
            self._retire(old)
        return entry

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

    def hold(self, entry: AdapterEntry) -> Hold:
        self.acquire(entry)
        return Hold(entry, self.release)

    def acquire(self, entry: AdapterEntry) -> None:
        entry.pending += 1
        if self._entries.get(entry.name) is entry:
            self._entries.move_to_end(entry.name)

    def release(self, entry: AdapterEntry) -> None:
        entry.pending -= 1
        if entry.retired and entry.pending == 0:
            self._free(entry)
