import pytest
import torch

from helpers import random_adapter
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.registry import AdapterExists, AdapterNotFound, AdapterRegistry
from ptmoe_serve.routing.reference import route_reference
from ptmoe_serve.routing.step import route_slots


def registry(**kwargs) -> AdapterRegistry:
    return AdapterRegistry(16, 64, torch.device("cpu"), **kwargs)


def soft_prompt(entry, x):
    return route_slots(entry.bank, torch.tensor([entry.slot]), x[None]).soft_prompt[0]


def test_add_get_and_route_from_the_bank():
    reg = registry()
    adapter = random_adapter(seed=1)
    entry = reg.add("a", adapter, version=1)
    assert reg.get("a") is entry and "a" in reg and len(reg) == 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(soft_prompt(entry, x.mean(0)), route_reference(adapter, x).soft_prompt)


def test_bank_grows_and_keeps_every_adapter():
    reg = registry()
    adapters = [random_adapter(seed=i) for i in range(20)]
    entries = [reg.add(f"a{i}", a, version=1) for i, a in enumerate(adapters)]
    bank = entries[0].bank
    assert all(e.bank is bank for e in entries) and bank.capacity == 32
    assert len({e.slot for e in entries}) == 20
    x = torch.randn(16)
    for entry, adapter in zip(entries, adapters):
        torch.testing.assert_close(soft_prompt(entry, x),
                                   route_reference(adapter, x[None]).soft_prompt)


def test_shapes_get_separate_banks():
    reg = registry()
    a = reg.add("a", random_adapter(prompt_length=4), version=1)
    b = reg.add("b", random_adapter(prompt_length=6), version=1)
    assert a.bank is not b.bank


def test_taken_name_needs_replace_and_a_replaced_entry_is_retired():
    reg = registry()
    first = reg.add("a", random_adapter(seed=1), version=1)
    with pytest.raises(AdapterExists):
        reg.add("a", random_adapter(seed=2), version=2)
    assert reg.get("a") is first
    second = reg.add("a", random_adapter(seed=2), replace=True, version=2)
    assert reg.get("a") is second and second.version == 2 and first.retired


def test_unload_frees_the_slot_for_reuse():
    reg = registry()
    entry = reg.add("a", random_adapter(seed=1), version=1)
    reg.remove("a")
    assert "a" not in reg
    with pytest.raises(AdapterNotFound):
        reg.get("a")
    assert reg.add("b", random_adapter(seed=2), version=1).slot == entry.slot


def test_a_slot_in_use_is_freed_only_after_its_step():
    reg = registry()
    old = reg.add("a", random_adapter(seed=1), version=1)
    reg.acquire(old)  # a routing step has queued a request for it
    reg.remove("a")
    other = reg.add("b", random_adapter(seed=2), version=1)
    assert other.slot != old.slot
    reg.release(old)
    assert reg.add("c", random_adapter(seed=3), version=1).slot == old.slot


def test_a_request_holds_its_slot_once_until_its_last_holder_leaves():
    reg = registry()
    old = reg.add("a", random_adapter(seed=1), version=1)
    hold = reg.hold(old)  # the HTTP request's
    assert hold.join() and old.pending == 1  # its engine request shares it
    reg.remove("a")
    hold.leave()  # the response ended; the engine request (a background one) runs on
    assert reg.add("b", random_adapter(seed=2), version=1).slot != old.slot
    hold.leave()
    assert old.pending == 0 and not hold.join()  # released: a late joiner holds anew
    assert reg.add("c", random_adapter(seed=3), version=1).slot == old.slot


def test_incompatible_adapters_are_refused():
    reg = registry(reserved_names={"base"})
    with pytest.raises(AdapterError, match="hidden_size is 8; the base model's is 16"):
        reg.add("a", random_adapter(hidden_size=8), version=1)
    with pytest.raises(AdapterError, match="leaves no room"):
        reg.add("a", random_adapter(prompt_length=64, rank=3), version=1)
    with pytest.raises(AdapterError, match="base model's name"):
        reg.add("base", random_adapter(), version=1)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        reg.add("../a", random_adapter(), version=1)
    assert len(reg) == 0


def test_soft_prompts_over_the_servers_limit_are_refused():
    reg = registry(max_prompt_length=8)
    reg.add("short", random_adapter(seed=1, prompt_length=8), version=1)
    with pytest.raises(AdapterError, match="over this server's limit of 8"):
        reg.add("long", random_adapter(seed=2, prompt_length=9), version=1)


def test_a_new_shape_starts_with_one_slot_and_its_bank_goes_with_its_last_adapter():
    dropped = []
    reg = registry(on_bank_dropped=dropped.append)
    first = reg.add("a", random_adapter(seed=1, rank=5), version=1)
    assert first.bank.capacity == 1
    second = reg.add("b", random_adapter(seed=2, rank=5), version=1)
    assert second.bank is first.bank and first.bank.capacity == 2
    reg.acquire(second)  # a request still reads b's slot
    reg.remove("a")
    reg.remove("b")
    assert dropped == [] and reg.bank_bytes == 2 * first.bank.bytes_per_slot  # kept
    reg.release(second)
    assert dropped == [first.bank.shape] and reg.bank_bytes == 0
    # The shape comes back small, in a new bank.
    again = reg.add("c", random_adapter(seed=3, rank=5), version=1)
    assert again.bank is not first.bank and again.bank.capacity == 1
