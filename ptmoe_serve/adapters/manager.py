"""Adapters coming and going while the server runs: load from an allowed folder, upload into
the store, unload, and follow the store folder as files are copied in or removed.

Every operation validates fully before it touches the registry or the store, so a refused
adapter changes nothing. Registry changes run on the event loop, between routing steps, so a
replace is atomic for requests: each one routes with exactly one version; an upload's parsing,
checks and fsyncs run in a thread first, one upload at a time.

The store is the one source of truth for every server over it (replicas): each change made
through any server is a line of the store's journal, whose numbering gives versions all servers
agree on, and the watcher reconciles each name a look at the store says changed (`sync_store`)
to what the store holds. A server never goes back to a version older than the one it serves.

A store folder that cannot be loaded, whatever is wrong with it, is skipped with a log line and
listed in `failed` (GET /v1/adapters), and tried again when its files change, until it loads or
goes; it never stops the start-up or the watcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import (PtMoeAdapter, check_weights_file, parse_config,
                                         parse_weights, read_adapter, read_config, read_weights)
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterExists, AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore, folder_stamp

logger = logging.getLogger(__name__)


class PathNotAllowed(AdapterError):
    """A folder outside every allowed root (after following symlinks)."""


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore,
                 extra_roots: list[Path] = (),
                 on_load: Callable[[AdapterEntry], None] = lambda entry: None,
                 on_unload: Callable[[str], None] = lambda name: None):
        self.registry = registry
        self.store = store
        # Told of each adapter loaded while serving (the engine route moves it to its workers).
        self.on_load = on_load
        # Told of each name unloaded (its metric series go).
        self.on_unload = on_unload
        self.allowed_roots = [store.root, *(Path(r).resolve() for r in extra_roots)]
        # Adapters (by name) whose folder could not be loaded, and why.
        self.failed: dict[str, str] = {}
        # Their folders and stamps when they failed: tried again once the stamp changes.
        self._retry: dict[str, tuple[Path, list[int] | None]] = {}
        self._upload_lock = asyncio.Lock()

    def start_in_batches(self, batch_parameters: int = 1 << 24) -> Iterator[list[AdapterEntry]]:
        """Serve what the store holds: its folders and the adapters linked from other roots,
        after undoing whatever a crash left half done. Loads as it is iterated: the entries
        come a batch (of about `batch_parameters` parameters) at a time, so each can move on,
        to the engine's workers, before the next is read. The banks are sized first for the
        adapters whose config and weights header passed every check, so a bulk load never
        copies a bank."""
        self.store.recover()
        names = self.store.changes() | self.store.manifest.linked.keys()
        found = []
        for name in sorted(names):
            folder = self._served_folder(name)
            if folder is None:
                continue
            stamp = folder_stamp(folder)
            with self._skipping(name, folder, stamp):
                config = read_config(folder, self.registry.check_compatible)
                check_weights_file(folder, config)
                found.append((name, folder, stamp, config))
        versions = self._versions([(name, folder, stamp) for name, folder, stamp, _ in found])
        self.registry.reserve(config for *_, config in found)
        batch, size = [], 0
        for name, folder, stamp, config in found:
            with self._skipping(name, folder, stamp):
                adapter = read_weights(folder, config)
                version = self._check_unchanged(folder, stamp, versions.get(name))
                batch.append(self.registry.add(name, adapter, version=version, source=folder))
                size += config.num_parameters
            if size >= batch_parameters:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _versions(self, found: list[tuple[str, Path, list[int]]]) -> dict[str, int]:
        """The store's versions of these folders, recording those no change recorded (none
        for a folder changed since it was read)."""
        versions = {name: self.store.version_of(name, folder, stamp)
                    for name, folder, stamp in found}
        unrecorded = [item for item in found if versions[item[0]] is None]
        if unrecorded:
            versions.update(self.store.record_found(unrecorded))
        return versions

    @contextmanager
    def _skipping(self, name: str, folder: Path, stamp: list[int] | None) -> Iterator[None]:
        """Any failure to load one folder skips that folder, logged and listed in `failed`,
        and tried again when its files change."""
        try:
            yield
        except Exception as e:  # whatever a hostile or half-copied folder raises
            self._fail(name, folder, stamp, e)
        else:
            self.failed.pop(name, None)
            self._retry.pop(name, None)

    def _fail(self, name: str, folder: Path, stamp: list[int] | None, error: Exception) -> None:
        reason = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
        self.failed[name] = reason
        self._retry[name] = (folder, stamp)
        logger.error("adapter %s (from %s) not loaded: %s", name, folder, reason)

    # -- operations behind the management API ---------------------------------------------

    def load_path(self, name: str, path: str, replace: bool) -> AdapterEntry:
        self.registry.check_name(name)
        folder = self._allowed_folder(path)
        if not replace and name in self.registry:
            raise AdapterExists(f"adapter {name!r} is already loaded; pass replace to swap it")
        stamp = folder_stamp(folder)
        adapter = self._read(folder)
        return self._add(name, adapter, self.store.record_loaded(name, folder, stamp), folder)

    async def upload(self, name: str, config: bytes, weights: bytes) -> AdapterEntry:
        """Create or replace `name` in the store from the two files' bytes: parsed, checked
        and written durably in a thread (one upload at a time: each holds its bytes several
        times over), then swapped in on the event loop."""
        self.registry.check_name(name)
        self._check_name_free_of_links(name)
        async with self._upload_lock:
            adapter, folder, version = await asyncio.to_thread(self._store_upload, name, config,
                                                               weights)
        return self._add(name, adapter, version, folder)

    def _store_upload(self, name: str, config: bytes, weights: bytes
                      ) -> tuple[PtMoeAdapter, Path, int]:
        parsed = parse_config(config)
        self.registry.check_compatible(parsed)
        adapter = parse_weights(weights, parsed)
        return adapter, *self.store.write(name, config, weights)

    def unload(self, name: str, purge: bool) -> AdapterEntry:
        entry = self.registry.remove(name)
        self.on_unload(name)
        from_store = entry.source is not None and self.store.contains(entry.source)
        self.store.record_unloaded(name, entry.source.name if purge and from_store else None)
        return entry

    def _read(self, folder: Path) -> PtMoeAdapter:
        return read_adapter(folder, self.registry.check_compatible)

    def _add(self, name: str, adapter: PtMoeAdapter, version: int, source: Path) -> AdapterEntry:
        """Serve `adapter` as `name` at the store's `version`, unless this server already
        serves that version or a newer one (another server's change, followed meanwhile)."""
        current = self.registry.find(name)
        if current is not None and current.version >= version:
            return current
        started = time.perf_counter()
        entry = self.registry.add(name, adapter, version=version, replace=True, source=source)
        self.on_load(entry)
        self.failed.pop(name, None)
        self._retry.pop(name, None)
        logger.info("loaded adapter %s v%d from %s in %.2f ms", name, version, source,
                    1000 * (time.perf_counter() - started))
        return entry

    def _allowed_folder(self, path: str) -> Path:
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
            raise AdapterError(f"adapter folder {path} does not exist")
        return folder

    def _check_name_free_of_links(self, name: str) -> None:
        if name in self.store.manifest.linked:
            raise AdapterError(f"adapter {name!r} is loaded from {self.store.manifest.linked[name]};"
                               " unload it before uploading under that name")

    @staticmethod
    def _check_unchanged(folder: Path, stamp: list[int] | None, version: int | None) -> int:
        """`version`, if the folder's files still bear the stamp they had when it was read."""
        if version is None or folder_stamp(folder) != stamp:
            raise AdapterError(f"{folder} changed while it was read; trying again when it "
                               "settles")
        return version

    # -- following the store --------------------------------------------------------------

    def sync_store(self) -> None:
        """One look at the store: each name it says changed (through any server, or by hand)
        and each failed folder whose files changed, reconciled to what the store holds."""
        changed = self.store.changes()
        changed |= {name for name, (folder, stamp) in self._retry.items()
                    if folder_stamp(folder) != stamp}
        for name in sorted(changed):
            self._reconcile(name)

    def _reconcile(self, name: str) -> None:
        current = self.registry.find(name)
        folder = self._served_folder(name)
        if folder is None:
            self.failed.pop(name, None)
            self._retry.pop(name, None)
            if current is not None:
                logger.info("adapter %s unloaded: the store no longer serves it", name)
                self.registry.remove(name)
                self.on_unload(name)
            return
        stamp = folder_stamp(folder)
        version = self.store.version_of(name, folder, stamp)
        if current is not None and version is not None and current.version >= version:
            return
        with self._skipping(name, folder, stamp):
            adapter = self._read(folder)
            if version is None:
                version = self._versions([(name, folder, stamp)]).get(name)
            self._add(name, adapter, self._check_unchanged(folder, stamp, version), folder)

    def _served_folder(self, name: str) -> Path | None:
        """The folder the store says `name` is served from, or None if it is not served (or
        is linked from a folder outside this server's roots: failed)."""
        linked = self.store.manifest.linked.get(name)
        if linked is not None:
            try:
                return self._allowed_folder(linked)
            except AdapterError as e:
                self._fail(name, Path(linked), None, e)
                return None
        folder = self.store.root / name
        if name in self.store.manifest.unloaded or not folder.is_dir():
            return None
        return folder

    async def watch(self, interval: float) -> None:
        """Follow the store until cancelled; no error ends it."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.sync_store()
            except Exception:
                logger.exception("cannot follow the adapter store; trying again in %.1f s",
                                 interval)
