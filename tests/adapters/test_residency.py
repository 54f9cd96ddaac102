"""The resident set (adapters/residency.py) over a real store: at most `capacity` adapters in
the banks, the least recently used one that nothing holds evicted for the next, pinned and held
adapters never; one load for concurrent first requests; a bounded wait, then a refusal, when
every slot is held; evicted adapters back from the host tier without a read."""

import asyncio

import pytest
import torch

from helpers import random_adapter
from ptmoe_serve.adapters.format import write_adapter
from ptmoe_serve.adapters.manager import AdapterManager, ResidencyLimits
from ptmoe_serve.adapters.registry import AdapterNotFound, AdapterRegistry
from ptmoe_serve.adapters.residency import LoadObserver, ResidentSetFull
from ptmoe_serve.adapters.store import AdapterStore
from ptmoe_serve.routing.reference import route_reference
from ptmoe_serve.routing.step import route_slots

ADAPTERS = {f"a{i}": random_adapter(seed=i, prompt_length=3 + i % 2) for i in range(6)}


def manager(tmp_path, capacity: int, host_capacity: int = 0, wait: float = 0.2):
    for name, adapter in ADAPTERS.items():
        write_adapter(adapter, tmp_path / "store" / name)
    loads, evictions = [], []
    observer = LoadObserver(lambda source, seconds: loads.append(source), evictions.append)
    m = AdapterManager(AdapterRegistry(16, 64, torch.device("cpu")),
                       AdapterStore(tmp_path / "store"), [],
                       ResidencyLimits(capacity, host_capacity, wait), observer=observer)
    m.start()
    return m, loads, evictions


def resident(m) -> set[str]:
    return {e.name for e in m.registry.entries()}


def routes_as_its_files(entry) -> bool:
    x = torch.randn(16)
    got = route_slots(entry.bank, torch.tensor([entry.slot]), x[None]).soft_prompt[0]
    return torch.allclose(got, route_reference(ADAPTERS[entry.name], x[None]).soft_prompt,
                          atol=1e-5)


def test_the_least_recently_used_unheld_adapter_makes_room(tmp_path):
    m, loads, evictions = manager(tmp_path, capacity=2)

    async def run():
        r = m.resident
        for name in ("a0", "a1"):
            r.release(await r.acquire(name))
        r.release(await r.acquire("a0"))  # a1 is now the least recently used
        held = await r.acquire("a2")
        assert resident(m) == {"a0", "a2"} and evictions == ["a1"]
        r.release(await r.acquire("a3"))  # a2 is held: a0 goes
        assert resident(m) == {"a2", "a3"} and evictions == ["a1", "a0"]
        assert routes_as_its_files(held) and routes_as_its_files(m.registry.get("a3"))
        r.release(held)

    asyncio.run(run())
    assert loads == ["disk"] * 4 and len(m.registry) <= 2


def test_concurrent_first_requests_load_once(tmp_path):
    m, loads, _ = manager(tmp_path, capacity=3)

    async def run():
        entries = await asyncio.gather(*(m.resident.acquire(name)
                                         for name in ["a0", "a1"] * 8))
        for entry in entries:
            m.resident.release(entry)
        return entries

    entries = asyncio.run(run())
    assert loads == ["disk", "disk"] and {e.name for e in entries} == {"a0", "a1"}
    assert all(e.pending == 0 for e in entries)


def test_a_pinned_adapter_is_never_evicted(tmp_path):
    m, _, evictions = manager(tmp_path, capacity=2)

    async def run():
        await m.resident.pin("a0")
        for name in ("a1", "a2", "a3", "a4"):
            m.resident.release(await m.resident.acquire(name))
        assert "a0" in resident(m) and "a0" not in evictions
        m.resident.unpin("a0")
        m.resident.release(await m.resident.acquire("a5"))
        assert "a0" in evictions

    asyncio.run(run())


def test_when_every_slot_is_held_a_cold_request_waits_then_is_refused_or_served(tmp_path):
    m, _, _ = manager(tmp_path, capacity=2, wait=0.3)

    async def run():
        r = m.resident
        held = [await r.acquire("a0"), await r.acquire("a1")]
        with pytest.raises(ResidentSetFull, match="--max-resident-adapters"):
            await r.acquire("a2")
        assert resident(m) == {"a0", "a1"}
        waiting = asyncio.ensure_future(r.acquire("a2"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        r.release(held[0])  # a slot frees while it waits: served
        entry = await waiting
        assert entry.name == "a2" and resident(m) == {"a1", "a2"} and routes_as_its_files(entry)
        r.release(entry)
        r.release(held[1])

    asyncio.run(run())


def test_an_evicted_adapter_comes_back_from_the_host_tier(tmp_path):
    m, loads, _ = manager(tmp_path, capacity=1, host_capacity=4)

    async def run():
        for name in ("a0", "a1", "a0"):
            m.resident.release(await m.resident.acquire(name))
        m.resident.forget("a1")  # the store changed it: read again
        m.resident.release(await m.resident.acquire("a1"))

    asyncio.run(run())
    assert loads == ["disk", "disk", "host", "disk"]
    assert routes_as_its_files(m.registry.get("a1"))


def test_the_host_tier_holds_that_many_evicted_adapters_besides_the_resident(tmp_path):
    m, loads, _ = manager(tmp_path, capacity=2, host_capacity=1)

    async def run():
        # a0 then a1 evicted to the host tier, which keeps the last one.
        for name in ("a0", "a1", "a2", "a3", "a1", "a0"):
            m.resident.release(await m.resident.acquire(name))

    asyncio.run(run())
    assert loads == ["disk"] * 4 + ["host", "disk"]
    assert len(m.resident.host_names()) == 1


def test_a_name_the_store_does_not_serve_is_not_found(tmp_path):
    m, loads, _ = manager(tmp_path, capacity=2)
    with pytest.raises(AdapterNotFound):
        asyncio.run(m.resident.acquire("nope"))
    assert loads == [] and len(m.registry) == 0



def test_a_loaded_adapter_is_held_for_its_requests_before_another_load_can_evict_it(tmp_path):
    """Two cold requests, one slot, both adapters in the host tier (loads that take no time):
    the first load's adapter is held for its request as it is placed, so the second load waits
    for that request instead of evicting the adapter before the request sees it (and that one
    then evicting the other's, and so on)."""
    m, loads, _ = manager(tmp_path, capacity=1, host_capacity=4, wait=5)

    async def run():
        r = m.resident
        for name in ("a0", "a1", "a2"):  # a0 and a1 go to the host tier
            r.release(await r.acquire(name))
        loads.clear()
        first = asyncio.ensure_future(r.acquire("a0"))
        second = asyncio.ensure_future(r.acquire("a1"))
        entry = await first
        assert entry.name == "a0" and entry.pending == 1 and not second.done()
        r.release(entry)
        other = await second
        assert other.name == "a1" and other.pending == 1 and resident(m) == {"a1"}
        r.release(other)

    asyncio.run(run())
    assert loads == ["host", "host"]


def test_a_request_that_leaves_while_its_adapter_loads_holds_nothing(tmp_path):
    m, loads, _ = manager(tmp_path, capacity=2)

    async def run():
        r = m.resident
        staying = asyncio.ensure_future(r.acquire("a0"))
        leaving = asyncio.ensure_future(r.acquire("a0"))
        await asyncio.sleep(0)
        leaving.cancel()
        entry = await staying
        assert entry.pending == 1 and leaving.cancelled()
        r.release(entry)

    asyncio.run(run())
    assert loads == ["disk"]
