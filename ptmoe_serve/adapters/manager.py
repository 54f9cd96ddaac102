"""Adapters coming and going while the server runs: the catalog of what the store serves, the
resident set it is read into on demand, loads from an allowed folder, uploads into the store,
unloads, and following the store as other servers or people change it.

Start-up reads the store's index (its journal, manifest and folder listing), never an
adapter's weights: the catalog names every adapter the store serves, and an adapter is read
when a request first needs it (residency.py), or at start-up when pinned.

Every operation validates fully before it touches the registry or the store, so a refused
adapter changes nothing. Registry changes run on the event loop, between routing steps, so a
replace is atomic for requests: each one routes with exactly one version; an upload's parsing,
checks and fsyncs run in a thread first, one upload at a time.

The store is the one source of truth for every server over it (replicas): each change made
through any server is a line of the store's journal, whose numbering gives versions all servers
agree on, and the watcher reconciles each name a look at the store says changed (`sync_store`):
the catalog follows, and a resident copy is replaced or unloaded. A server never goes back to a
version older than the one it serves.

A store folder that cannot be loaded, whatever is wrong with it, is listed in `failed` with the
reason (GET /v1/adapters) when a request or a pin first reads it, and read again once its files
change; it never stops the server or the watcher. A store that cannot take a write (full,
read-only, locked by a peer: a StoreError) is not the adapter's fault, and is not remembered.

Every store call runs on the store's own threads (store.py `call`), and this server's state
changes only once the store's has: an unload the store refused leaves the adapter served. A
change wins over a load that raced it: each name's change counter is bumped by every unload,
replace and reconcile, and a load that finds it moved reads the adapter again (or, unloaded,
gives up) instead of placing what it fetched."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ptmoe_serve.adapters.catalog import AdapterCatalog
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import PtMoeAdapter, parse_config, parse_weights, read_adapter
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterExists, AdapterNotFound, AdapterRegistry
from ptmoe_serve.adapters.residency import Fetched, LoadObserver, ResidentSet
from ptmoe_serve.adapters.store import AdapterStore, folder_stamp
from ptmoe_serve.disk import StoreError

logger = logging.getLogger(__name__)


class PathNotAllowed(AdapterError):
    """A folder outside every allowed root (after following symlinks)."""


class FolderNotFound(AdapterError):
    """An adapter folder, inside the allowed roots, that does not exist."""


@dataclass(frozen=True)
class ResidencyLimits:
    """How many adapters the banks hold, how many more stay decoded on the host, and how long
    a request for a cold adapter waits for a slot when every one is held."""

    capacity: int
    host_capacity: int
    wait_seconds: float


# What a manager holds without a bound (tools and tests): every adapter resident, so no
# request waits.
UNBOUNDED = ResidencyLimits(1 << 30, 0, 0.0)


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore,
                 extra_roots: list[Path] = (), limits: ResidencyLimits = UNBOUNDED,
                 on_unload: Callable[[str], None] = lambda name: None,
                 observer: LoadObserver = LoadObserver(),
                 on_resident: Callable[[AdapterEntry], None] = lambda entry: None):
        self.registry = registry
        self.store = store
        # Told of each name no longer resident (its metric series go).
        self.on_unload = on_unload
        self.allowed_roots = [store.root, *(Path(r).resolve() for r in extra_roots)]
        self.catalog = AdapterCatalog(store.root)
        # Changes made to each name since start (unload, replace, reconcile).
        self._changes: dict[str, int] = {}
        self.resident = ResidentSet(
            registry, self.fetch, limits.capacity, limits.host_capacity, limits.wait_seconds,
            on_resident=on_resident,
            observer=LoadObserver(observer.loaded, self._evicted(observer.evicted)),
            change_count=self.change_count)
        # Adapters (by name) whose folder could not be loaded, and why.
        self.failed: dict[str, str] = {}
        # Their folders and stamps when they failed: read again once the stamp changes.
        self._failed_at: dict[str, tuple[Path, list[int] | None]] = {}
        self._upload_lock = asyncio.Lock()
        self._newest_cache: tuple[tuple | None, list[str]] = (None, [])

    def _evicted(self, observe: Callable[[str], None]) -> Callable[[str], None]:
        def evicted(name: str) -> None:
            self.on_unload(name)
            observe(name)
        return evicted

    def change_count(self, name: str) -> int:
        return self._changes.get(name, 0)

    def _changed(self, name: str) -> None:
        self._changes[name] = self._changes.get(name, 0) + 1

    def start(self) -> None:
        """Undo whatever a crash left half done, then read the store's index into the
        catalog: its folders and the adapters linked from other roots, not their weights."""
        self.store.recover()
        listed = self.store.changes()
        linked = {name: self._served_folder(name) for name in self.store.manifest.linked}
        self.catalog.reset(
            in_store=(name for name in listed if name not in linked and self._in_store(name)),
            linked={name: folder for name, folder in linked.items() if folder})

    # -- reading an adapter ---------------------------------------------------------------

    async def fetch(self, name: str) -> Fetched:
        """`name` as the store serves it: read and checked in a thread, its version the
        store's. AdapterNotFound if the store does not serve it; AdapterError, naming the
        problem, if its folder fails (and until its files change)."""
        folder = self.catalog.folder(name)
        if folder is None:
            raise AdapterNotFound(name)
        stamp = await self.store.call(folder_stamp, folder)
        if self._failed_at.get(name) == (folder, stamp):
            raise AdapterError(self.failed[name])
        try:
            adapter, version = await self.store.call(self._read_versioned, name, folder, stamp)
        except StoreError:
            raise  # the store's fault, not the adapter's: served once the store takes writes
        except Exception as e:  # whatever a hostile or half-copied folder raises
            raise self._fail(name, folder, stamp, e) from None
        self._clear_failure(name)
        return Fetched(adapter, version, folder)

    def _read_versioned(self, name: str, folder: Path, stamp: list[int] | None
                        ) -> tuple[PtMoeAdapter, int]:
        return self._read(folder), self._version(name, folder, stamp)

    def _version(self, name: str, folder: Path, stamp: list[int] | None) -> int:
        """The store's version of `name` served from `folder`, recording one if no change
        recorded it (a folder copied in by hand), if its files still bear `stamp`."""
        version = self.store.found_version(name, folder, stamp)
        if version is None or folder_stamp(folder) != stamp:
            raise AdapterError(f"{folder} changed while it was read; trying again when it "
                               "settles")
        return version

    def _fail(self, name: str, folder: Path, stamp: list[int] | None, error: Exception
              ) -> AdapterError:
        reason = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
        self.failed[name] = reason
        self._failed_at[name] = (folder, stamp)
        logger.error("adapter %s (from %s) not loaded: %s", name, folder, reason)
        return error if isinstance(error, AdapterError) else AdapterError(reason)

    def _clear_failure(self, name: str) -> None:
        self.failed.pop(name, None)
        self._failed_at.pop(name, None)

    def _read(self, folder: Path) -> PtMoeAdapter:
        return read_adapter(folder, self.registry.check_compatible)

    # -- what /v1/models lists ----------------------------------------------------------------

    def listed(self, bound: int) -> list[str]:
        """The adapters a model list names: every one the store serves while it holds at most
        `bound`; beyond, the resident and pinned ones, then the newest (by the journal's
        versions) up to `bound`. Resident first, each part in name order."""
        resident = sorted(e.name for e in self.registry.entries())
        if len(self.catalog) <= bound:
            others = self.catalog.page(None, len(self.catalog))
        else:
            others = sorted(self.resident.pinned) + self._newest(bound)
        shown, names = set(resident), list(resident)
        for name in others:
            if len(names) >= max(bound, len(resident)):
                break
            if name not in shown and name in self.catalog:
                shown.add(name)
                names.append(name)
        return names

    def _newest(self, count: int) -> list[str]:
        """The `count` names with the newest journal lines, computed again only when the
        journal moved (a pass over its names, once per change)."""
        key = (self.store.journal.last_version, count)
        if self._newest_cache[0] != key:
            latest = self.store.journal.latest
            newest = heapq.nlargest(count, (name for name, line in latest.items()
                                            if not line.get("unloaded")),
                                    key=lambda name: latest[name]["version"])
            self._newest_cache = (key, sorted(newest))
        return self._newest_cache[1]

    # -- operations behind the management API ---------------------------------------------

    async def load_path(self, name: str, path: str, replace: bool) -> AdapterEntry:
        self.registry.check_name(name)
        folder = await self.store.call(self.allowed_folder, path)
        if not replace and name in self.catalog:
            raise AdapterExists(f"adapter {name!r} is already loaded; pass replace to swap it")
        adapter, version = await self.store.call(self._read_recorded, name, folder)
        return self._add(name, adapter, version, folder)

    def _read_recorded(self, name: str, folder: Path) -> tuple[PtMoeAdapter, int]:
        stamp = folder_stamp(folder)
        adapter = self._read(folder)
        return adapter, self.store.record_loaded(name, folder, stamp)

    async def upload(self, name: str, config: bytes, weights: bytes) -> AdapterEntry:
        """Create or replace `name` in the store from the two files' bytes: parsed, checked
        and written durably in a thread (one upload at a time: each holds its bytes several
        times over), then swapped in on the event loop."""
        self.registry.check_name(name)
        self._check_name_free_of_links(name)
        async with self._upload_lock:
            adapter, folder, version = await self.store.call(self._store_upload, name, config,
                                                             weights)
        return self._add(name, adapter, version, folder)

    def _store_upload(self, name: str, config: bytes, weights: bytes
                      ) -> tuple[PtMoeAdapter, Path, int]:
        parsed = parse_config(config)
        self.registry.check_compatible(parsed)
        adapter = parse_weights(weights, parsed)
        return adapter, *self.store.write(name, config, weights)

    async def unload(self, name: str, purge: bool) -> Path:
        """Stop serving `name` (and remove its store folder with `purge`); the folder it was
        served from. The store first: if it refuses, `name` is still served."""
        source = self.catalog.folder(name)
        if source is None:
            raise AdapterNotFound(name)
        from_store = self.store.contains(source) and source.name == name
        await self.store.call(self.store.record_unloaded, name,
                              name if purge and from_store else None)
        self._drop(name)
        return source

    def _drop(self, name: str) -> None:
        """`name` is not served any more: out of the catalog and the banks."""
        self._changed(name)
        self.catalog.set(name, None)
        self.resident.forget(name)
        self.resident.unpin(name)
        self._clear_failure(name)
        if name in self.registry:
            self.registry.remove(name)
            self.on_unload(name)

    def _add(self, name: str, adapter: PtMoeAdapter, version: int, source: Path,
             force: bool = False) -> AdapterEntry:
        """Serve `adapter` as `name` at the store's `version`, resident at once, unless this
        server already serves that version or a newer one (another server's change, followed
        meanwhile; `force`: a read-only store's content versions, which have no order)."""
        current = self.registry.find(name)
        if current is not None and current.version >= version and not force:
            return current
        started = time.perf_counter()
        self._changed(name)
        self.catalog.set(name, source)
        self.resident.forget(name)
        entry = self.resident.place(name, Fetched(adapter, version, source))
        self._clear_failure(name)
        logger.info("loaded adapter %s v%d from %s in %.2f ms", name, version, source,
                    1000 * (time.perf_counter() - started))
        return entry

    def allowed_folder(self, path: str) -> Path:
        raw = Path(path).expanduser()
        if not raw.is_absolute():
            raise AdapterError(f"path {path!r} must be absolute")
        # The roots first, on the path with its symlinks followed as far as they exist: the
        # same 403 whether or not a path outside them exists.
        folder = raw.resolve()
        if not any(folder.is_relative_to(root) for root in self.allowed_roots):
            raise PathNotAllowed(
                f"{path} is outside the allowed roots ({', '.join(map(str, self.allowed_roots))});"
                " add one with --allow-adapter-path")
        if not folder.is_dir():
            raise FolderNotFound(f"adapter folder {path} does not exist")
        return folder

    def _check_name_free_of_links(self, name: str) -> None:
        if name in self.store.manifest.linked:
            raise AdapterError(f"adapter {name!r} is loaded from {self.store.manifest.linked[name]};"
                               " unload it before uploading under that name")

    # -- following the store --------------------------------------------------------------

    async def sync_store(self) -> None:
        """One look at the store, on the store's threads: each name it says changed (through
        any server, or by hand) reconciled to what the store holds. A failed folder whose files
        changed is read again at its next request."""
        stamps = await self.store.call(lambda: {
            name: folder_stamp(folder) for name, (folder, _) in list(self._failed_at.items())})
        for name, stamp in stamps.items():
            if name in self._failed_at and self._failed_at[name][1] != stamp:
                self._clear_failure(name)
        for name in sorted(await self.store.call(self.store.changes)):
            await self._reconcile(name)

    async def _reconcile(self, name: str) -> None:
        folder = self._served_folder(name)
        if folder is None:
            if name in self.registry:
                logger.info("adapter %s unloaded: the store no longer serves it", name)
            self._drop(name)
            return
        self._changed(name)
        self.catalog.set(name, folder)
        self.resident.forget(name)
        current = self.registry.find(name)
        if current is None:
            return  # read at its next request
        stamp = await self.store.call(folder_stamp, folder)
        version = self.store.version_of(name, folder, stamp)
        if version is not None and current.version >= version:
            return
        # Resident here: the store's new version replaces it at once, on every server.
        try:
            adapter, version = await self.store.call(self._read_versioned, name, folder, stamp)
        except StoreError as e:
            logger.warning("adapter %s changed in the store but cannot be read again yet: %s",
                           name, e)
            return
        except Exception as e:
            self._fail(name, folder, stamp, e)
            return
        if self.store.read_only and version != current.version:
            current = None  # versions from content: different bytes, a new version
        self._add(name, adapter, version, folder, force=current is None)

    def _served_folder(self, name: str) -> Path | None:
        """The folder the store says `name` is served from, or None if it is not served (or
        is linked from a folder outside this server's roots: failed). Called after a look at
        the store, whose folder listing it reads instead of the disk."""
        linked = self.store.manifest.linked.get(name)
        if linked is not None:
            try:
                return self.allowed_folder(linked)
            except AdapterError as e:
                self._fail(name, Path(linked), None, e)
                return None
        return self.store.root / name if self._in_store(name) else None

    def _in_store(self, name: str) -> bool:
        """Whether `name`, not linked from elsewhere, is served from its store folder."""
        return name not in self.store.manifest.unloaded and self.store.lists(name)

    async def watch(self, interval: float) -> None:
        """Follow the store until cancelled; no error ends it."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync_store()
            except Exception:
                logger.exception("cannot follow the adapter store; trying again in %.1f s",
                                 interval)
