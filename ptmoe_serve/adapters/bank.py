"""Adapter banks: all resident adapters of one shape (experts, prompt length, rank) as a few
stacked float32 tensors with a slot per adapter, so a routing step gathers its rows in one
indexing op (routing/step.py). A new shape starts with one slot; a bank grows by doubling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.adapters.format import PtMoeAdapter


@dataclass(frozen=True)
class BankShape:
    num_experts: int
    prompt_length: int
    rank: int

    @staticmethod
    def of(config: AdapterConfig) -> BankShape:
        return BankShape(config.num_experts, config.prompt_length, config.rank)

    def bytes_per_slot(self, hidden_size: int) -> int:
        """One adapter's bytes in a bank: its float32 tensors, its top_k and its scaling."""
        n, t, r, h = self.num_experts, self.prompt_length, self.rank, hidden_size
        return 4 * (n * t * r + r * h + n * h + n) + 8 + 1


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
        return self.shape.bytes_per_slot(self.hidden_size)

    def _grow(self, capacity: int) -> None:
        old, old_capacity = self._tensors, self.capacity
        self._tensors = self._allocate(capacity)
        for key, tensor in old.items():
            self._tensors[key][:old_capacity] = tensor
        # Highest first, so `put` pops the lowest free slot.
        self._free.extend(range(capacity - 1, old_capacity - 1, -1))

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
