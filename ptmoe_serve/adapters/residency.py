"""The resident set: which of the store's adapters are in the banks now.

At most `capacity` adapters are resident, across all shapes. A name's first request loads it:
read and checked in a thread, off the event loop, then written into the banks (on the engine
route, into vLLM's workers, between two engine steps); concurrent first requests for one name
share one load, and a request for a resident adapter never waits on a load. Room is made by
evicting the least recently used adapter that no request holds; a pinned adapter is never
evicted, and one a request holds stays (a preempted request may read its slot again). When
every slot is held, a request for a cold adapter waits, a bounded number of them for a bounded
time, then is refused (`ResidentSetFull`, a 503 to try again). Evicted adapters stay decoded
in a host tier of `host_capacity` (least recently used out first), so that bringing one back
is a copy, not a read and a decode: this process keeps a decoded copy of each resident adapter
for that, and the tier holds that many more."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ptmoe_serve.adapters.format import PtMoeAdapter
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterRegistry, Hold

# Requests for cold adapters waiting for a slot at once, at most (each holds its request).
MAX_WAITING = 1024
# Reads of one load that a change to its name may make stale before it gives up.
LOAD_TRIES = 3


@dataclass(eq=False)
class _Load:
    """A load in progress, and how many requests wait for it."""

    task: asyncio.Future | None = None
    waiters: int = 0


class ResidentSetFull(Exception):
    """Every slot is held by running requests, for longer than a cold request may wait."""


@dataclass(frozen=True)
class Fetched:
    """An adapter as read from the store: its tensors, the store's version, its folder."""

    adapter: PtMoeAdapter
    version: int
    source: Path


@dataclass(frozen=True)
class LoadObserver:
    """Told of each load (its source, "disk" or "host", and seconds) and each eviction."""

    loaded: Callable[[str, float], None] = lambda source, seconds: None
    evicted: Callable[[str], None] = lambda name: None


class ResidentSet:
    def __init__(self, registry: AdapterRegistry, fetch: Callable[[str], Awaitable[Fetched]],
                 capacity: int, host_capacity: int, wait_seconds: float,
                 max_waiting: int | None = None,
                 on_resident: Callable[[AdapterEntry], None] = lambda entry: None,
                 observer: LoadObserver = LoadObserver(),
                 change_count: Callable[[str], int] = lambda name: 0):
        """`fetch(name)` reads a store adapter; `on_resident(entry)` is told of each adapter
        placed in the banks (the engine route writes it into its workers); `change_count(name)`
        moves whenever the name is unloaded, replaced or reconciled, so that a load never
        places what such a change made stale."""
        if capacity < 1:
            raise ValueError("the resident set holds at least one adapter")
        self.registry = registry
        self._fetch = fetch
        self.capacity = capacity
        self.host_capacity = host_capacity
        self.wait_seconds = wait_seconds
        # Cold requests that may wait for a slot at once; more are refused straight away.
        self.max_waiting = MAX_WAITING if max_waiting is None else max_waiting
        self.on_resident = on_resident
        self._observer = observer
        self._change_count = change_count
        self.pinned: set[str] = set()
        self._loading: dict[str, _Load] = {}
        # Decoded copies, where there is a host tier: of each resident adapter (to keep on
        # eviction, without a read) and of evicted ones (the tier).
        self._copies: dict[str, Fetched] = {}
        self._host: OrderedDict[str, Fetched] = OrderedDict()
        self._released = asyncio.Event()
        self._waiting = 0

    def __len__(self) -> int:
        return len(self.registry)

    # -- requests ------------------------------------------------------------------------

    async def acquire(self, name: str) -> AdapterEntry:
        """`name`'s entry, held until `release`: at once if resident, else once loaded (one
        load however many ask). Raises the load's error: AdapterNotFound, AdapterError (a
        folder that fails its checks), ResidentSetFull."""
        entry = self.registry.find(name)
        if entry is not None:
            self.registry.acquire(entry)
            return entry
        load = self._loading.get(name)
        if load is None:
            load = self._loading[name] = _Load()
            load.task = asyncio.ensure_future(self._load(name, load))
        load.waiters += 1
        # The load is every waiter's: one cancelled waiter does not cancel it.
        try:
            return await asyncio.shield(load.task)
        except asyncio.CancelledError:
            if load.task.done() and not load.task.cancelled() and load.task.exception() is None:
                self.release(load.task.result())  # it was held for this waiter
            else:
                load.waiters -= 1
            raise

    async def hold(self, name: str) -> Hold:
        """`acquire`, as a request's hold: released by its last holder's `leave`."""
        return Hold(await self.acquire(name), self.release)

    def release(self, entry: AdapterEntry) -> None:
        self.registry.release(entry)
        if entry.pending == 0:
            self._released.set()

    async def _load(self, name: str, load: _Load) -> AdapterEntry:
        """Make `name` resident; its entry, held once for each request waiting for it. The
        holds are taken as it is placed, before any other load can run: another load's
        eviction could otherwise take it back before its waiters see it, again and again."""
        try:
            started = time.perf_counter()
            for _ in range(LOAD_TRIES):
                seen = self._change_count(name)
                fetched = self._host.get(name)
                source = "host" if fetched is not None else "disk"
                if fetched is None:
                    fetched = await self._fetch(name)
                await self._room_for_one()
                # Unloaded or replaced while it was read or waited for a slot: what it fetched
                # is stale. Read again (an unloaded name's fetch raises AdapterNotFound).
                if self._change_count(name) == seen:
                    break
            else:
                raise ResidentSetFull(f"adapter {name!r} changed {LOAD_TRIES} times while it "
                                      "was being loaded; try again shortly")
            entry = self.registry.find(name)  # a management call may have placed it meanwhile
            if entry is None:
                entry = self.place(name, fetched)
            for _ in range(load.waiters):
                self.registry.acquire(entry)
            self._observer.loaded(source, time.perf_counter() - started)
            return entry
        finally:
            # Done as the load ends: a request arriving later finds the entry, or loads anew.
            del self._loading[name]

    async def _room_for_one(self) -> None:
        """Evict until there is room for one more, waiting (bounded) while every slot is held."""
        if self._evict_for(1):
            return
        if self._waiting >= self.max_waiting:
            raise self._full()
        self._waiting += 1
        try:
            deadline = time.monotonic() + self.wait_seconds
            while not self._evict_for(1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._full()
                self._released.clear()
                try:
                    await asyncio.wait_for(self._released.wait(), remaining)
                except TimeoutError:
                    raise self._full() from None
        finally:
            self._waiting -= 1

    def _full(self) -> ResidentSetFull:
        return ResidentSetFull(
            f"every one of the {self.capacity} adapter slots (--max-resident-adapters) is held "
            f"by running requests or pinned; try again shortly")

    # -- placing and evicting ------------------------------------------------------------

    def place(self, name: str, fetched: Fetched) -> AdapterEntry:
        """Put `fetched` in the banks as `name` (replacing the resident version, if any),
        evicting what it takes to stay within the capacity if nothing holds it; over the
        capacity for a while otherwise (a management call does not wait)."""
        if name not in self.registry:
            self._evict_for(1)
        entry = self.registry.add(name, fetched.adapter, version=fetched.version, replace=True,
                                  source=fetched.source)
        self._host.pop(name, None)
        if self.host_capacity > 0:  # kept for the host tier, which it would join if evicted
            self._copies[name] = fetched
        self.on_resident(entry)
        return entry

    def _evict_for(self, count: int) -> bool:
        """Evict least recently used adapters nothing holds until `count` more fit; whether
        they do."""
        while len(self.registry) + count > self.capacity:
            victim = next((e for e in self.registry.least_recently_used()
                           if e.pending == 0 and e.name not in self.pinned), None)
            if victim is None:
                return False
            self.registry.remove(victim.name)
            self._keep_on_host(victim.name)
            self._observer.evicted(victim.name)
        return True

    def _keep_on_host(self, name: str) -> None:
        fetched = self._copies.pop(name, None)
        if fetched is None or self.host_capacity <= 0:
            return
        self._host[name] = fetched
        while len(self._host) > self.host_capacity:
            self._host.popitem(last=False)

    def forget(self, name: str) -> None:
        """`name` left the banks other than by eviction (unloaded or replaced): drop its copies,
        which are stale or unwanted."""
        self._copies.pop(name, None)
        self._host.pop(name, None)

    def host_names(self) -> list[str]:
        return list(self._host)

    # -- pins ------------------------------------------------------------------------------

    async def pin(self, name: str) -> AdapterEntry:
        """Make `name` resident for good (never evicted until unpinned)."""
        entry = await self.acquire(name)
        self.pinned.add(name)
        self.release(entry)
        return entry

    def unpin(self, name: str) -> None:
        self.pinned.discard(name)
