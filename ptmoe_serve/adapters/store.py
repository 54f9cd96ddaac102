"""The adapter store: the `--adapters` folder on disk, kept consistent across crashes, and the
one source of truth for every server reading it.

An upload is validated in memory, written to a hidden folder beside its target, flushed, and
renamed into place, so a reader (or a restart) sees the old adapter or the new one, never half
of one. What a restart must remember beyond the folders themselves (adapters loaded from other
allowed roots, adapters unloaded on request) is kept in a small manifest, replaced atomically;
every change is also a line of the store's journal (journal.py), which numbers the versions.

Servers sharing one store (replicas) make every change under one file lock on the store, the
folder, the manifest and the journal together: two uploads of one name end with one whole
folder and one version, a server starting never clears another's upload in progress as
interrupted, and no server's manifest change is lost. Each follows the others through
`changes`: the journal's new lines, and the store folder's own listing when it changed (for
folders copied in or removed by hand).

Faults are answers, not crashes (disk.py): the lock is tried for a bounded time, every change
that meets a full disk or a read-only volume is refused whole with a StoreError saying so, and
nothing in this process changes until the store has. A store on a read-only volume is served
as it is: nothing is created in it, and an adapter that no journal line names gets a version
from its files' bytes, the same on every replica. The server calls all of this through
`call`, on threads of the store's own, so a stuck lock or a slow volume never holds up a
request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR

from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.adapters.journal import JOURNAL, Journal
from ptmoe_serve.disk import (DEFAULT_LOCK_TIMEOUT, StoreBusy, StoreError, StoreFull,
                              StoreReadOnly, classify, failpoint, file_lock, fsync_dir,
                              read_only, store_errors, write_atomically)

logger = logging.getLogger(__name__)

MANIFEST = ".ptmoe-manifest.json"
STORE_LOCK = ".ptmoe-store.lock"
STAGING_PREFIX = ".staging-"
# A folder replaced: restored by recovery if its replacement never arrived...
RETIRED_PREFIX = ".retired-"
# ... and one purged: removed by recovery, never restored half deleted.
PURGING_PREFIX = ".purging-"
# Threads doing the store's work for the server: lock waits are bounded, so a few suffice.
STORE_THREADS = 4
# Space kept back for unloads: a full store frees it so that an unload can still be recorded
# (as etcd keeps deletes working when its disk is full). Written again at the next start.
RESERVE = ".ptmoe-reserve"
RESERVE_BYTES = 256 * 1024
# Versions made from an adapter's bytes on a read-only store sit above every journal version.
CONTENT_VERSION_BASE = 1 << 48
# A folder's modification time ticks coarsely (milliseconds; on a network file system, the
# server's clock): a change made in the same tick as a listing leaves the time as it was. So a
# listing after a change is confirmed by one more this long after, when that tick has passed...
LISTING_SETTLE_NS = 2_000_000_000
# ... and a listing moved on by journal lines alone (whose last tick another change by hand may
# share) by one more after this long.
LISTING_RECHECK_NS = 30_000_000_000


@dataclass
class Manifest:
    linked: dict[str, str] = field(default_factory=dict)  # name -> folder outside the store
    unloaded: set[str] = field(default_factory=set)  # store folders not to serve


def folder_stamp(folder: Path) -> list[int] | None:
    """Identity, modification time and size of an adapter folder's two files: changes whenever
    either is written or replaced (None while one is missing)."""
    try:
        stats = [(folder / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    return [n for s in stats for n in (s.st_ino, s.st_mtime_ns, s.st_size)]


class AdapterStore:
    def __init__(self, root: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.root = root.resolve()
        self.lock_timeout = lock_timeout
        with store_errors(self.root):
            if not self.root.is_dir():
                self.root.mkdir(parents=True)
        self.read_only = read_only(self.root)
        # What the last change found: False after a full disk or a read-only volume refused it.
        self.writable = not self.read_only
        self.journal = Journal(self.root / JOURNAL)
        if not self.read_only:
            with store_errors(self.root):
                self.journal.path.touch()  # created once: appends never change the store folder
        self.journal.read_new()
        self.journal.take_lines()
        self._manifest_seen: tuple | None = None
        self.manifest = self._read_manifest()
        # One change at a time in this process (each thread also takes the file lock).
        self._state = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        # The store folder's listing as last looked at: each adapter folder's inode (a folder
        # moved into place under a taken name is new), the folder's modification time it
        # reflects, and when (monotonic) to list it again to confirm it.
        self._listing: dict[str, int] = {}
        self._listed_at: int | None = None
        self._confirm_at: int | None = None
        # The store folder's modification time at the start of this server's change in
        # progress (under the lock), recorded in its journal line.
        self._root_before: int | None = None

    async def call(self, work: Callable, *args):
        """`work(*args)` on one of the store's threads (not the default executor, which stuck
        lock waits would exhaust): the event loop never waits on the disk or a peer's lock."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="ptmoe-store")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def recover(self) -> None:
        """Finish or undo what a crash interrupted: staged uploads never became adapters,
        purges are finished, and a retired folder whose replacement never arrived comes back.
        A read-only store is served as it is."""
        if self.read_only:
            logger.info("the adapter store %s is read-only: serving what it holds", self.root)
            return
        with self._locked():
            self._recover()
            try:
                if not (self.root / RESERVE).exists():
                    write_atomically(self.root / RESERVE, bytes(RESERVE_BYTES))
            except OSError as e:
                logger.warning("no space kept back for unloads in %s: %s", self.root, e)

    def _recover(self) -> None:
        # Names, not paths: a path object for each of a million folders takes seconds.
        entries = os.listdir(self.root)
        for entry in entries:
            if entry.startswith((MANIFEST + ".", JOURNAL + ".", "." + MANIFEST + ".")):
                (self.root / entry).unlink()
            elif entry.startswith(STAGING_PREFIX):
                logger.warning("removing an interrupted upload: %s", entry)
                shutil.rmtree(self.root / entry, ignore_errors=True)
            elif entry.startswith(PURGING_PREFIX):
                logger.warning("finishing an interrupted purge: %s", entry)
                shutil.rmtree(self.root / entry, ignore_errors=True)
        for entry in entries:
            if entry.startswith(RETIRED_PREFIX):
                name = entry[len(RETIRED_PREFIX):].rsplit("-", 1)[0]
                if (self.root / name).exists():
                    shutil.rmtree(self.root / entry, ignore_errors=True)
                else:
                    logger.warning("restoring %s: its replacement was interrupted", name)
                    (self.root / entry).rename(self.root / name)

    def contains(self, path: Path) -> bool:
        return path.resolve().parent == self.root

    def lists(self, name: str) -> bool:
        """Whether the store folder held a folder of this name at the last look (`changes`):
        no stat, however many the store holds."""
        return name in self._listing

    # -- following the store ----------------------------------------------------------------

    def changes(self) -> set[str]:
        """Names changed since the last call, by any server or by hand: the journal's new
        lines (the manifest read again after them), and, when the store folder's listing
        changed, the folders that appeared, went or were moved into place. A look at an
        unchanged store is an open, a stat and a read of nothing."""
        with self._state:
            changed = self.journal.read_new()
            # The manifest read again when it changed (a stat): an unload that died between its
            # manifest and its journal line reaches every server all the same.
            before = self.manifest
            if changed or self._manifest_changed():
                self.manifest = self._read_manifest()
                changed |= before.unloaded ^ self.manifest.unloaded
                changed |= {name for name in before.linked.keys() | self.manifest.linked.keys()
                            if before.linked.get(name) != self.manifest.linked.get(name)}
            self._follow_journaled_changes()
            return changed | self._listing_changes()

    def _follow_journaled_changes(self) -> None:
        """A change made through the API records the store folder's modification time before
        and after it, and its folder's inode after it: where the listing is current up to the
        time before, the change alone moved it on, and the listing follows the line instead of
        listing the folder again."""
        lines = self.journal.take_lines()
        if lines is None:  # too many to keep since the last look: the folder is listed again
            self._listed_at = None
            return
        for line in lines:
            before, after = line.get("root_before"), line.get("root_after")
            if before is None or before != self._listed_at:
                continue
            if line.get("inode") is None:
                self._listing.pop(line["name"], None)
            else:
                self._listing[line["name"]] = line["inode"]
            self._listed_at = after
            if self._confirm_at is None:
                self._confirm_at = time.monotonic_ns() + LISTING_RECHECK_NS

    def _listing_changes(self) -> set[str]:
        modified = self.root.stat().st_mtime_ns  # before listing: a change during it is seen next time
        now = time.monotonic_ns()
        if modified == self._listed_at and (self._confirm_at is None or now < self._confirm_at):
            return set()
        self._confirm_at = now + LISTING_SETTLE_NS if modified != self._listed_at else None
        self._listed_at = modified
        # The inode comes with the directory entry: no stat per folder.
        listing = {e.name: e.inode() for e in os.scandir(self.root)
                   if not e.name.startswith(".") and e.is_dir()}
        changed = {name for name, _ in listing.items() ^ self._listing.items()}
        self._listing = listing
        # Unloaded folders removed since: a folder of that name copied in later is new.
        gone = self.manifest.unloaded - listing.keys()
        if gone and not self.read_only:
            try:
                self.forget_unloaded(gone)
            except StoreError as e:  # the next look tries again
                logger.warning("cannot update the store's manifest: %s", e)
        return changed | gone

    def version_of(self, name: str, folder: Path, stamp: list[int] | None) -> int | None:
        """The version the journal gives `name` served from `folder` with files bearing
        `stamp`, if it records one."""
        return self.journal.version_of(name, self._where(name, folder), stamp)

    def found_version(self, name: str, folder: Path, stamp: list[int] | None) -> int | None:
        """The version of a folder being read for serving: the journal's (no lock taken);
        else, on a writable store, a new line for it (a folder copied in by hand); on a
        read-only one, a number made from its files' bytes, so that every replica gives it
        the same. None if the folder changed since `stamp`."""
        version = self.version_of(name, folder, stamp)
        if version is not None:
            return version
        if self.read_only:
            return content_version(folder)
        return self.record_found([(name, folder, stamp)]).get(name)

    def _where(self, name: str, folder: Path) -> str | None:
        """How the journal names a folder: None for the store's own folder of that name (so
        servers mounting the store at different paths agree), else its path."""
        return None if self.contains(folder) and folder.name == name else str(folder)

    # -- changes, each under the store's lock -------------------------------------------------

    def write(self, name: str, config: bytes, weights: bytes) -> tuple[Path, int]:
        """Write an adapter's two files under `name`, replacing any folder there atomically, and
        record it as loaded; the folder and its version."""
        with self._locked():
            folder = self._write(name, config, weights)
            return folder, self._record_loaded(name, folder, folder_stamp(folder))

    def record_loaded(self, name: str, folder: Path, stamp: list[int] | None) -> int:
        """Record `name` as served from `folder` (read while its files bore `stamp`); its new
        version."""
        with self._locked():
            if folder_stamp(folder) != stamp:
                raise AdapterError(f"{folder} changed while it was read; load it again")
            return self._record_loaded(name, folder, stamp)

    def record_found(self, found: list[tuple[str, Path, list[int]]]) -> dict[str, int]:
        """Versions for folders served that no change recorded (copied in by hand, or a store
        older than its journal): the one another server recorded for the same files, or a new
        one. A folder changed since it was read gets none."""
        with self._locked():
            self.journal.read_new()
            versions, new = {}, []
            for name, folder, stamp in found:
                known = self.version_of(name, folder, stamp)
                if known is not None:
                    versions[name] = known
                elif folder_stamp(folder) == stamp:
                    new.append(self._loaded_line(name, folder, stamp))
            if new:
                versions.update(zip((c["name"] for c in new), self._append(new)))
            return versions

    def record_unloaded(self, name: str, purge: str | None = None) -> None:
        """Record `name` as unloaded, removing its store folder `purge` first if given. On a
        full disk too: the space kept back is freed for it (a purge frees a folder besides)."""
        try:
            self._record_unloaded(name, purge)
        except StoreFull:
            if not (self.root / RESERVE).exists():
                raise
            (self.root / RESERVE).unlink(missing_ok=True)
            logger.warning("the adapter store %s is full: freed the space kept back to record "
                           "the unload of %s", self.root, name)
            self._record_unloaded(name, purge)  # each step is done or skipped again

    def _record_unloaded(self, name: str, purge: str | None) -> None:
        with self._locked():
            if purge is not None:
                self._purge(purge)

            def change(manifest: Manifest) -> None:
                manifest.linked.pop(name, None)
                if (self.root / name).is_dir():
                    manifest.unloaded.add(name)

            self._change_manifest(change)
            failpoint("unload-manifest-written")
            self._append([{"name": name, "unloaded": True}])

    def forget_unloaded(self, names: set[str]) -> None:
        """Unloaded adapters whose folders are gone: a folder of such a name copied in is new."""
        with self._locked():
            self._change_manifest(lambda manifest: manifest.unloaded.difference_update(
                name for name in names if not (self.root / name).is_dir()))

    def _record_loaded(self, name: str, folder: Path, stamp: list[int] | None) -> int:
        def change(manifest: Manifest) -> None:
            manifest.unloaded.discard(name)
            if self.contains(folder) and folder.name == name:
                manifest.linked.pop(name, None)
            else:
                manifest.linked[name] = str(folder)

        self._change_manifest(change)
        [version] = self._append([self._loaded_line(name, folder, stamp)])
        return version

    def _loaded_line(self, name: str, folder: Path, stamp: list[int] | None) -> dict:
        return {"name": name, "folder": self._where(name, folder), "stamp": stamp}

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
            fsync_dir(staging)  # its entries too, before the rename makes it the adapter
            failpoint("upload-staged")
            target = self.root / name
            if target.exists():
                retired = self.root / f"{RETIRED_PREFIX}{name}-{token}"
                target.rename(retired)
                failpoint("replace-retired")
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
            fsync_dir(self.root)
            failpoint("upload-renamed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _purge(self, name: str) -> None:
        """Gone at the rename (recovery finishes the delete); the rest frees the space."""
        folder = self.root / name
        if folder.is_dir():
            purging = self.root / f"{PURGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            folder.rename(purging)
            fsync_dir(self.root)
            failpoint("purge-renamed")
            (purging / CONFIG_FILE).unlink(missing_ok=True)
            failpoint("purge-deleting")
            shutil.rmtree(purging, ignore_errors=True)

    def _change_manifest(self, change: Callable[[Manifest], None]) -> None:
        """Read, change and write the manifest (if the change changed it); the caller holds the
        store's lock."""
        self.manifest = self._read_manifest()
        before = (dict(self.manifest.linked), set(self.manifest.unloaded))
        change(self.manifest)
        if (self.manifest.linked, self.manifest.unloaded) != before:
            self._write_manifest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's exclusive lock, held across servers (and threads) sharing it, tried for
        --store-lock-timeout; every I/O error inside is a StoreError naming the store, and
        `writable` says whether the volume took the change."""
        if self.read_only:
            raise classify(OSError(30, os.strerror(30)), self.root)  # EROFS
        if not self._state.acquire(timeout=self.lock_timeout):
            raise StoreBusy(f"the adapter store {self.root} is busy with another change of "
                            f"this server for longer than {self.lock_timeout:g} s "
                            "(--store-lock-timeout); try again shortly")
        try:
            with store_errors(self.root), file_lock(self.root / STORE_LOCK, self.lock_timeout,
                                                    f"the adapter store {self.root}"):
                self._root_before = self.root.stat().st_mtime_ns
                try:
                    yield
                finally:
                    self._root_before = None
            self.writable = True
        except (StoreFull, StoreReadOnly):
            self.writable = False
            raise
        finally:
            self._state.release()

    def _append(self, changes: list[dict]) -> list[int]:
        """Journal this change (under the lock), with the store folder's modification time
        before and after it, and the inode of the store's folder of that name after it."""
        after = self.root.stat().st_mtime_ns
        return self.journal.append([{**change, "root_before": self._root_before,
                                     "root_after": after,
                                     "inode": _folder_inode(self.root / change["name"])}
                                    for change in changes])

    def _manifest_changed(self) -> bool:
        return self._manifest_stat() != self._manifest_seen

    def _manifest_stat(self) -> tuple | None:
        try:
            stat = (self.root / MANIFEST).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read_manifest(self) -> Manifest:
        path = self.root / MANIFEST
        self._manifest_seen = self._manifest_stat()
        if self._manifest_seen is None:
            return Manifest()
        try:
            data = json.loads(path.read_text())
            return Manifest(dict(data.get("linked", {})), set(data.get("unloaded", [])))
        except (OSError, ValueError, AttributeError) as e:
            raise AdapterError(f"the store's manifest {path} is unreadable: {e}") from None

    def _write_manifest(self) -> None:
        data = {"linked": self.manifest.linked, "unloaded": sorted(self.manifest.unloaded)}
        write_atomically(self.root / MANIFEST, json.dumps(data, indent=2).encode())
        self._manifest_seen = self._manifest_stat()


def content_version(folder: Path) -> int:
    """A version from an adapter's two files' bytes: the same for the same content on every
    replica of a read-only store, above every version a journal gives."""
    digest = hashlib.blake2b(digest_size=6)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return CONTENT_VERSION_BASE + int.from_bytes(digest.digest())


def _folder_inode(path: Path) -> int | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino if S_ISDIR(stat.st_mode) else None
