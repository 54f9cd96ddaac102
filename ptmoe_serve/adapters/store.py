"""The adapter store: the `--adapters` folder on disk, kept consistent across crashes.

An upload is validated in memory, written to a hidden folder beside its target, flushed, and
renamed into place, so a reader (or a restart) sees the old adapter or the new one, never half
of one. What a restart must remember beyond the folders themselves (adapters loaded from other
allowed roots, adapters unloaded on request) is kept in a small manifest, replaced atomically.

Servers sharing one store (replicas) make every change under one file lock on the store:
uploads and purges (so two writing one name at once end with one whole folder, and a server
starting never clears another's upload in progress as interrupted) and the manifest (each
reading it afresh first, so none loses another's change); each follows the others' manifest
changes through `reload_manifest`."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterError

logger = logging.getLogger(__name__)

MANIFEST = ".ptmoe-manifest.json"
STORE_LOCK = ".ptmoe-store.lock"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"


@dataclass
class Manifest:
    linked: dict[str, str] = field(default_factory=dict)  # name -> folder outside the store
    unloaded: set[str] = field(default_factory=set)  # store folders not to serve


@dataclass(frozen=True)
class FolderSignature:
    """Changes whenever either file of an adapter folder is rewritten."""

    stamps: tuple[tuple[int, int], ...]

    @staticmethod
    def of(folder: Path) -> FolderSignature | None:
        try:
            stats = [(folder / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
        except OSError:
            return None
        return FolderSignature(tuple((s.st_mtime_ns, s.st_size) for s in stats))


class AdapterStore:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest_seen = self._manifest_signature()
        self.manifest = self._read_manifest()

    def recover(self) -> None:
        """Finish or undo what a crash interrupted: staged uploads never became adapters, and
        a retired folder whose replacement never arrived comes back."""
        with self._locked():
            self._recover()

    def _recover(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(MANIFEST + "."):
                path.unlink()
            elif path.name.startswith(STAGING_PREFIX):
                logger.warning("removing an interrupted upload: %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():
            if path.name.startswith(RETIRED_PREFIX):
                name = path.name[len(RETIRED_PREFIX):].rsplit("-", 1)[0]
                if (self.root / name).exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    logger.warning("restoring %s: its replacement was interrupted", name)
                    path.rename(self.root / name)

    def folders(self) -> dict[str, Path]:
        """Adapter folders in the store, by name (hidden folders excluded)."""
        return {p.name: p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def contains(self, path: Path) -> bool:
        return path.resolve().parent == self.root

    def write(self, name: str, config: bytes, weights: bytes) -> Path:
        """Write an adapter's two files under `name`, replacing any folder there atomically."""
        with self._locked():
            return self._write(name, config, weights)

    def _write(self, name: str, config: bytes, weights: bytes) -> Path:
        token = uuid.uuid4().hex[:8]
        staging = self.root / f"{STAGING_PREFIX}{name}-{token}"
        staging.mkdir()
        try:
            for file_name, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)):
                with open(staging / file_name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(staging)  # its entries too, before the rename makes it the adapter
            target = self.root / name
            if target.exists():
                retired = self.root / f"{RETIRED_PREFIX}{name}-{token}"
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def purge(self, name: str) -> None:
        with self._locked():
            self._purge(name)

    def _purge(self, name: str) -> None:
        folder = self.root / name
        if folder.is_dir():
            retired = self.root / f"{RETIRED_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            folder.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)

    # -- the manifest ---------------------------------------------------------------------

    def remember_loaded(self, name: str, source: Path) -> None:
        def change(manifest: Manifest) -> None:
            manifest.unloaded.discard(name)
            if self.contains(source) and source.name == name:
                manifest.linked.pop(name, None)
            else:
                manifest.linked[name] = str(source)

        self._update_manifest(change)

    def remember_unloaded(self, name: str) -> None:
        def change(manifest: Manifest) -> None:
            manifest.linked.pop(name, None)
            if (self.root / name).is_dir():
                manifest.unloaded.add(name)

        self._update_manifest(change)

    def forget_unloaded(self, names: set[str]) -> None:
        if names:
            self._update_manifest(lambda manifest: manifest.unloaded.difference_update(names))

    def reload_manifest(self) -> bool:
        """Read the manifest again if it changed on disk since last read (another replica's
        change, or this one's); whether it did."""
        signature = self._manifest_signature()
        if signature == self._manifest_seen:
            return False
        self._manifest_seen = signature
        self.manifest = self._read_manifest()
        return True

    def _update_manifest(self, change: Callable[[Manifest], None]) -> None:
        """Read, change and write the manifest under the store's lock."""
        with self._locked():
            self.manifest = self._read_manifest()
            change(self.manifest)
            self._write_manifest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's exclusive lock, held across servers (and threads) sharing it."""
        with open(self.root / STORE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _manifest_signature(self) -> tuple[int, int, int] | None:
        try:
            stat = (self.root / MANIFEST).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read_manifest(self) -> Manifest:
        path = self.root / MANIFEST
        if not path.exists():
            return Manifest()
        try:
            data = json.loads(path.read_text())
            return Manifest(dict(data.get("linked", {})), set(data.get("unloaded", [])))
        except (OSError, ValueError, AttributeError) as e:
            raise AdapterError(f"the store's manifest {path} is unreadable: {e}") from None

    def _write_manifest(self) -> None:
        data = {"linked": self.manifest.linked, "unloaded": sorted(self.manifest.unloaded)}
        staging = self.root / f"{MANIFEST}.{uuid.uuid4().hex[:8]}"
        with open(staging, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, self.root / MANIFEST)
        _fsync_dir(self.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
