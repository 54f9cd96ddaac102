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
each name, keeping their versions; readers see a new file and read it whole once."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

JOURNAL = ".ptmoe-journal"
# Compacted when it holds more than this many lines beyond two per name.
COMPACT_SLACK = 10_000


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.latest: dict[str, dict] = {}  # name -> its latest line
        self.last_version = 0
        self._lines = 0
        self._inode: int | None = None
        self._offset = 0
        # Lines read and not yet taken (`take_lines`), in order.
        self._unseen: list[dict] = []

    def read_new(self) -> set[str]:
        """Read the lines added since the last call; the names they change. A journal
        rewritten (compacted) since is read whole, and only names whose latest line differs
        are returned."""
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
            try:
                record = json.loads(line)
                name, version = record["name"], int(record["version"])
            except (ValueError, KeyError, TypeError):
                logger.warning("skipping an unreadable line of the store's journal: %.80r", line)
                continue
            self.latest[name] = record
            self._unseen.append(record)
            self.last_version = max(self.last_version, version)
            self._lines += 1
            changed.add(name)
        if before is not None:
            changed = {name for name in before.keys() | self.latest.keys()
                       if before.get(name) != self.latest.get(name)}
        return changed

    def take_lines(self) -> list[dict]:
        """The lines read since the last call, in order (this server's own included)."""
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
        numbered on from the last line; their versions. The caller holds the store's lock."""
        self.read_new()
        self._drop_torn_tail()
        records = [{"version": self.last_version + 1 + i, **change}
                   for i, change in enumerate(changes)]
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.read_new()
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

    def _compact(self) -> None:
        staging = self.path.with_name(self.path.name + ".compacting")
        records = sorted(self.latest.values(), key=lambda r: int(r["version"]))
        with open(staging, "wb") as f:
            f.writelines(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, self.path)
        self.read_new()
        logger.info("compacted the store's journal to %d lines", len(records))
