"""The store's journal: every change made to the store (an adapter uploaded, loaded, found
copied in by hand, unloaded) as one JSON line, appended under the store's lock.

Its numbering is the adapters' versions, so servers sharing a store agree on them and a version
names one content for good: a load's line holds the folder and the stamp of its files, and a
server reading that folder uses the line's version only while the stamp matches. Each server
reads only the lines added since its last look, so following the store costs one open and one
read of what changed, however many adapters it holds. Opening it afresh at each look is what a
network file system needs too: close-to-open consistency shows every line another machine
appended and closed before the open.

When it holds far more lines than names, it is rewritten (under the lock) to the latest line of
each name, keeping their versions; readers see a new file and read it whole once.

As etcd's WAL: each line carries a checksum of its bytes, an append writes its whole lines or
fails the change (cut back, so no torn line is acknowledged and no version reused), and a line
that does not verify or whose fields have the wrong types is skipped with a warning: a damaged
line never stops a start. Lines without a checksum (journals written before it) are read when
their fields check."""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from pathlib import Path

from ptmoe_serve.disk import failpoint, fsync_dir

logger = logging.getLogger(__name__)
CHECKSUM = b',"crc":'

JOURNAL = ".ptmoe-journal"
# Compacted when it holds more than this many lines beyond two per name.
COMPACT_SLACK = 10_000
# Lines kept for `take_lines` at most: a reader that never takes them (the fine-tuning worker,
# a server that does not watch) holds no more; past it they are dropped and the taker told.
MAX_UNTAKEN_LINES = 4096


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.latest: dict[str, dict] = {}  # name -> its latest line
        self.last_version = 0
        self._lines = 0
        self._inode: int | None = None
        self._offset = 0
        # Lines read and not yet taken (`take_lines`), in order; None once more were read
        # than MAX_UNTAKEN_LINES.
        self._unseen: list[dict] | None = []
        # The upload threads and the event loop both read it: one reader at a time.
        self._reading = threading.RLock()

    def read_new(self) -> set[str]:
        """Read the lines added since the last call; the names they change. A journal
        rewritten (compacted) since is read whole, and only names whose latest line differs
        are returned."""
        with self._reading:
            return self._read_new()

    def _read_new(self) -> set[str]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return set()
        with f:
            inode = os.fstat(f.fileno()).st_ino
            before = None
            if inode != self._inode:
                before, self.latest = self.latest, {}
                self._inode, self._offset, self._lines = inode, 0, 0
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits
        self._offset += len(complete)
        changed = set()
        for line in complete.splitlines():
            record = parse_line(line)
            if record is None:
                logger.warning("skipping a damaged line of the store's journal %s: %.80r",
                               self.path, line)
                continue
            name, version = record["name"], record["version"]
            self.latest[name] = record
            if self._unseen is not None:
                self._unseen.append(record)
                if len(self._unseen) > MAX_UNTAKEN_LINES:
                    self._unseen = None
            self.last_version = max(self.last_version, version)
            self._lines += 1
            changed.add(name)
        if before is not None:
            changed = {name for name in before.keys() | self.latest.keys()
                       if before.get(name) != self.latest.get(name)}
        return changed

    def take_lines(self) -> list[dict] | None:
        """The lines read since the last call, in order (this server's own included); None
        where more than MAX_UNTAKEN_LINES were, and were not kept."""
        with self._reading:
            lines, self._unseen = self._unseen, []
            return lines

    def version_of(self, name: str, folder: str | None, stamp: list[int] | None) -> int | None:
        """The version of `name` served from `folder` (None: the store's own folder of that
        name) whose files bear `stamp`, if the journal's latest line of that name records it."""
        record = self.latest.get(name)
        if (stamp is None or record is None or record.get("unloaded")
                or record.get("folder") != folder or record.get("stamp") != stamp):
            return None
        return int(record["version"])

    def append(self, changes: list[dict]) -> list[int]:
        """Append one line per change (each a name, and for a load its folder and stamp),
        numbered on from the last line; their versions. The caller holds the store's lock.
        Whole or not at all: a write or flush that fails (a full disk) is cut back and raised."""
        with self._reading:
            self._read_new()
            self._drop_torn_tail()
            records = [{"version": self.last_version + 1 + i, **change}
                       for i, change in enumerate(changes)]
            data = b"".join(map(format_line, records))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, os.strerror(28))  # a short write: the disk filled
                failpoint("journal-appended")
                os.fsync(fd)
            except BaseException:
                self._drop_torn_tail()
                raise
            finally:
                os.close(fd)
            self._read_new()
            if self._lines > 2 * len(self.latest) + COMPACT_SLACK:
                self._compact()
            return [r["version"] for r in records]

    def _drop_torn_tail(self) -> None:
        """Under the lock no one is writing: bytes after the last whole line are what a crash
        left of an append, and go."""
        try:
            if os.stat(self.path).st_size > self._offset:
                os.truncate(self.path, self._offset)
        except FileNotFoundError:
            pass
        except OSError as e:  # a read-only store: the append fails next, and says why
            logger.warning("cannot cut the torn end of %s: %s", self.path, e)

    def _compact(self) -> None:
        staging = self.path.with_name(self.path.name + ".compacting")
        records = sorted(self.latest.values(), key=lambda r: int(r["version"]))
        try:
            with open(staging, "wb") as f:
                f.writelines(map(format_line, records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, self.path)
            fsync_dir(self.path.parent)  # or a power cut could bring the long journal back
        except OSError as e:  # the change is made; compacting waits for the next append
            staging.unlink(missing_ok=True)
            logger.warning("cannot compact %s: %s", self.path, e)
            return
        self._read_new()
        logger.info("compacted the store's journal to %d lines", len(records))


def format_line(record: dict) -> bytes:
    """A record as one line, its checksum (CRC-32 of the bytes before it) last."""
    body = json.dumps(record, separators=(",", ":")).encode()[:-1]
    return body + CHECKSUM + str(zlib.crc32(body)).encode() + b"}\n"


def parse_line(line: bytes) -> dict | None:
    """A line's record, or None if it does not verify, parse or check: a name that is a
    string, a whole positive version, and each other field of its type."""
    at = line.rfind(CHECKSUM)
    if at >= 0:
        body = line[:at]
        try:
            if int(line[at + len(CHECKSUM):].rstrip()[:-1]) != zlib.crc32(body):
                return None
        except ValueError:
            return None
        line = body + b"}"
    try:
        record = json.loads(line, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not _checks(record):
        return None
    return record


def _refuse(constant: str):
    raise ValueError(f"{constant} is not a number a journal line holds")


def _int(value, optional: bool = True) -> bool:
    return (value is None and optional) or (type(value) is int and value >= 0)


def _checks(record: dict) -> bool:
    stamp = record.get("stamp")
    return (isinstance(record.get("name"), str) and _int(record.get("version"), False)
            and record["version"] > 0
            and isinstance(record.get("folder"), (str, type(None)))
            and (stamp is None or (isinstance(stamp, list) and all(map(_int, stamp))
                                   and None not in stamp))
            and all(_int(record.get(key)) for key in ("root_before", "root_after", "inode"))
            and isinstance(record.get("unloaded", False), bool))
