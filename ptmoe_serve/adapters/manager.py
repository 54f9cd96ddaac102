"""Adapters coming and going while the server runs: load from an allowed folder, upload into
the store, unload, and follow the store folder as files are copied in or removed.

Every operation validates fully before it touches the registry or the store, so a refused
adapter changes nothing. Registry changes run on the event loop, between routing steps, so a
replace is atomic for requests: each one routes with exactly one version; an upload's parsing,
checks and fsyncs run in a thread first, one upload at a time.

A store folder that cannot be loaded, whatever is wrong with it, is skipped with a log line and
listed in `failed` (GET /v1/adapters) until it loads or goes; it never stops the start-up or
the watcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ptmoe_serve.adapters.format import (AdapterError, PtMoeAdapter, check_weights_file,
                                         parse_config, parse_weights, read_adapter, read_config,
                                         read_weights, validate_name)
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore, FolderSignature

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
        # Store folders already acted on, so the watcher loads each version once.
        self._seen: dict[str, FolderSignature] = {}
        # Adapters (by name) whose folder could not be loaded, and why.
        self.failed: dict[str, str] = {}
        self._upload_lock = asyncio.Lock()
        self._uploading: set[str] = set()
        # The manifest's unloaded names as last followed (see `_follow_manifest`).
        self._unloaded_before = set(store.manifest.unloaded)

    def start_in_batches(self, batch_parameters: int = 1 << 24) -> Iterator[list[AdapterEntry]]:
        """Serve what was served before: the store's folders and the adapters linked from
        other roots, after undoing whatever a crash left half done. Loads as it is iterated:
        the entries come a batch (of about
        `batch_parameters` parameters) at a time, so each can move on, to the engine's
        workers, before the next is read. The banks are sized first for the adapters whose
        config and weights header passed every check, so a bulk load never copies a bank."""
        self.store.recover()
        _, changed = self._scan_store()
        linked = [(name, Path(path)) for name, path in sorted(self.store.manifest.linked.items())]
        found = []
        for name, folder in changed + linked:
            with self._skipping(name, folder):
                config = read_config(folder, self.registry.check_compatible)
                check_weights_file(folder, config)
                found.append((name, folder, config))
        self.registry.reserve(config for _, _, config in found)
        batch, size = [], 0
        for name, folder, config in found:
            with self._skipping(name, folder):
                batch.append(self.registry.add(name, read_weights(folder, config),
                                               source=folder))
                size += config.num_parameters
            if size >= batch_parameters:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    @contextmanager
    def _skipping(self, name: str, folder: Path) -> Iterator[None]:
        """Any failure to load one folder skips that folder, logged and listed in `failed`."""
        try:
            yield
        except Exception as e:  # whatever a hostile or half-copied folder raises
            reason = str(e) if isinstance(e, AdapterError) else f"{type(e).__name__}: {e}"
            self.failed[name] = reason
            logger.error("adapter %s (from %s) not loaded: %s", name, folder, reason)
        else:
            self.failed.pop(name, None)

    # -- operations behind the management API ---------------------------------------------

    def load_path(self, name: str, path: str, replace: bool) -> AdapterEntry:
        validate_name(name)
        folder = self._allowed_folder(path)
        entry = self._add(name, self._read(folder), replace=replace, source=folder)
        self.store.remember_loaded(name, folder)
        return entry

    async def upload(self, name: str, config: bytes, weights: bytes) -> AdapterEntry:
        """Create or replace `name` in the store from the two files' bytes: parsed, checked
        and written durably in a thread (one upload at a time: each holds its bytes several
        times over), then swapped in on the event loop."""
        validate_name(name)
        self.registry.check_name(name)
        self._check_name_free_of_links(name)
        async with self._upload_lock:
            self._uploading.add(name)  # the watcher leaves the folder to this upload
            try:
                adapter, folder = await asyncio.to_thread(self._store_upload, name, config,
                                                          weights)
                self._seen[name] = FolderSignature.of(folder)
            finally:
                self._uploading.discard(name)
        entry = self._add(name, adapter, replace=True, source=folder)
        self.failed.pop(name, None)
        self.store.remember_loaded(name, folder)
        return entry

    def _store_upload(self, name: str, config: bytes, weights: bytes
                      ) -> tuple[PtMoeAdapter, Path]:
        parsed = parse_config(config)
        self.registry.check_compatible(parsed)
        adapter = parse_weights(weights, parsed)
        return adapter, self.store.write(name, config, weights)

    def unload(self, name: str, purge: bool) -> AdapterEntry:
        entry = self.registry.remove(name)
        self.on_unload(name)
        self.store.remember_unloaded(name)
        if purge and entry.source is not None and self.store.contains(entry.source):
            self.store.purge(entry.source.name)
            self._seen.pop(entry.source.name, None)
        return entry

    def _read(self, folder: Path) -> PtMoeAdapter:
        return read_adapter(folder, self.registry.check_compatible)

    def _add(self, name: str, adapter: PtMoeAdapter, replace: bool,
             source: Path) -> AdapterEntry:
        started = time.perf_counter()
        entry = self.registry.add(name, adapter, replace=replace, source=source)
        self.on_load(entry)
        logger.info("loaded adapter %s v%d from %s in %.2f ms", name, entry.version, source,
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

    # -- following the store folder -------------------------------------------------------

    def sync_store(self) -> None:
        """Follow the manifest, load new or changed store folders, unload the ones removed
        from disk."""
        self._follow_manifest()
        folders, changed = self._scan_store()
        for name, folder in changed:
            # A folder still being copied is tried again when it changes.
            with self._skipping(name, folder):
                self._add(name, self._read(folder), replace=True, source=folder)
        for name in [name for name in self.failed
                     if name not in folders and name not in self.store.manifest.linked]:
            del self.failed[name]
        for entry in self.registry.entries():
            if (entry.source is not None and self.store.contains(entry.source)
                    and entry.source.name not in folders):
                logger.info("adapter %s unloaded: its folder was removed", entry.name)
                self.registry.remove(entry.name)
                self.on_unload(entry.name)
                self._seen.pop(entry.source.name, None)

    def _follow_manifest(self) -> None:
        """What other servers over this store recorded since: an adapter unloaded, loaded
        again, or linked from another allowed root (checked against this server's roots).
        Idempotent: this server's own changes find nothing left to do."""
        if not self.store.reload_manifest():
            return
        manifest = self.store.manifest
        for entry in self.registry.entries():
            from_its_folder = (entry.source is not None and self.store.contains(entry.source)
                               and entry.source.name == entry.name)
            linked = manifest.linked.get(entry.name)
            if (entry.name in manifest.unloaded if from_its_folder
                    else linked is None and entry.name not in self._uploading):
                logger.info("adapter %s unloaded: unloaded through another server",
                            entry.name)
                self.registry.remove(entry.name)
                self.on_unload(entry.name)
        for name, path in sorted(manifest.linked.items()):
            current = self.registry.get(name) if name in self.registry else None
            if current is None or str(current.source) != path:
                with self._skipping(name, Path(path)):
                    folder = self._allowed_folder(path)
                    self._add(name, self._read(folder), replace=True, source=folder)
        # Store folders loaded again elsewhere: the scan below loads them here too.
        for name in self._unloaded_before - manifest.unloaded:
            if name not in self.registry:
                self._seen.pop(name, None)
        self._unloaded_before = set(manifest.unloaded)

    def _scan_store(self) -> tuple[dict[str, Path], list[tuple[str, Path]]]:
        """The store's folders by name, and those new or changed since last seen (to load)."""
        folders = self.store.folders()
        # An unloaded adapter's folder that is gone: a new folder of that name is a new adapter.
        self.store.forget_unloaded(self.store.manifest.unloaded - folders.keys())
        changed = []
        for name, folder in sorted(folders.items()):
            signature = FolderSignature.of(folder)
            if (signature is None or name in self.store.manifest.unloaded or name in self._uploading
                    or name in self.store.manifest.linked or self._seen.get(name) == signature):
                continue
            self._seen[name] = signature
            changed.append((name, folder))
        return folders, changed

    async def watch(self, interval: float) -> None:
        """Follow the store until cancelled; no error ends it."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.sync_store()
            except Exception:
                logger.exception("cannot follow the adapter store; trying again in %.1f s",
                                 interval)

