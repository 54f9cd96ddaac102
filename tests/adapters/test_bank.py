"""Adapter banks (adapters/bank.py): a bank in the engine's workers follows the slots and size
the server's registry chose."""

import torch

from helpers import random_adapter
from ptmoe_serve.adapters.bank import AdapterBank, bank_rows
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.routing.step import route_slots


def registry() -> AdapterRegistry:
    return AdapterRegistry(16, 64, torch.device("cpu"))


def test_a_mirror_bank_follows_the_slots_and_size_it_is_given():
    """The engine workers' banks take the slots and capacity the server's registry chose,
    a batch of stacked rows at a time."""
    reg = registry()
    entries = [reg.add(f"a{i}", random_adapter(seed=i), version=1) for i in range(9)]
    bank = entries[0].bank
    mirror = AdapterBank(bank.shape, 16, torch.device("cpu"))
    for batch in (entries[5:], entries[:5]):  # the highest slots first
        mirror.write_rows(torch.tensor([e.slot for e in batch]),
                          bank_rows([e.adapter for e in batch]), capacity=bank.capacity)
    assert mirror.capacity == bank.capacity == 16
    slots = torch.tensor([e.slot for e in entries])
    x = torch.randn(len(entries), 16)
    torch.testing.assert_close(route_slots(mirror, slots, x).soft_prompt,
                               route_slots(bank, slots, x).soft_prompt)
