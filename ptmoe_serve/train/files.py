"""Training files as OpenAI's files API keeps them: JSONL uploaded for fine-tuning, kept in the
adapter store (so every server and fine-tuning worker over the store sees the same files), each
as its bytes and a small record beside them.

A file is checked at upload for being JSONL, a JSON object on every line that is not blank, and
for OpenAI's rules on chat messages' `weight` (which need no tokenizer); what its lines mean
(chat or prompt/completion examples) is checked, line by line, by the job that uses it."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ptmoe_serve.disk import store_writes, write_atomically
from ptmoe_serve.train.data import weight_problem

FILES_FOLDER = ".ptmoe-files"
PURPOSE = "fine-tune"
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
MAX_FILENAME_CHARS = 255


class FileError(ValueError):
    """An upload this server does not keep (a 400)."""


class FileNotFound(KeyError):
    pass


@dataclass(frozen=True)
class TrainingFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    lines: int
    created_ns: int  # orders files created within one second

    def describe(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


def count_jsonl_lines(data: bytes) -> int:
    """The number of JSON objects in `data`, one a line (blank lines skipped); a FileError
    naming the first line that is not one, or whose messages' weights are not OpenAI's."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"the file is not UTF-8 text (byte {e.start}); fine-tuning takes "
                        "JSONL: one JSON object a line") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise FileError(f"line {number} is not JSON ({_short(e)}); fine-tuning takes "
                            "JSONL: one JSON object a line") from None
        if not isinstance(value, dict):
            raise FileError(f"line {number} is a JSON {type(value).__name__}, not an object; "
                            "fine-tuning takes JSONL: one JSON object a line")
        problem = weight_problem(value.get("messages"))
        if problem:
            raise FileError(f"line {number}, {problem}")
        count += 1
    if count == 0:
        raise FileError("the file holds no lines; fine-tuning takes JSONL: one JSON object a "
                        "line")
    return count


class TrainingFiles:
    def __init__(self, store_root: Path):
        # Made by the first upload: a read-only store has none.
        self.folder = store_root / FILES_FOLDER

    def add(self, filename: str, purpose: str, data: bytes) -> TrainingFile:
        if purpose != PURPOSE:
            raise FileError(f"purpose {purpose!r} is not one this server takes; it keeps files "
                            f"for fine-tuning: purpose '{PURPOSE}'")
        lines = count_jsonl_lines(data)
        now = time.time_ns()
        # Ordered by creation (milliseconds, then random digits): the names are the index.
        record = TrainingFile(id=f"file-{now // 10**6:012x}{secrets.token_hex(6)}", bytes=len(data),
                              created_at=now // 10**9, filename=_clean(filename),
                              purpose=purpose, lines=lines, created_ns=now)
        # The bytes first, the record last: a file is listed only once it is whole.
        with store_writes(self.folder):
            write_atomically(self.content_path(record.id), data)
            write_atomically(self._record_path(record.id), json.dumps(asdict(record)).encode())
        return record

    def get(self, file_id: str) -> TrainingFile:
        if not FILE_ID.fullmatch(file_id):
            raise FileNotFound(file_id)
        try:
            return TrainingFile(**json.loads(self._record_path(file_id).read_bytes()))
        except FileNotFoundError:
            raise FileNotFound(file_id) from None

    def page(self, after: str | None, limit: int, newest_first: bool = True
             ) -> tuple[list[TrainingFile], bool]:
        """Up to `limit` files after the file `after`, newest first unless not
        `newest_first`; whether more follow. Only the page's records are read: the folder's
        names are the index."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            names = []
        ids = sorted((n[:-5] for n in names if n.endswith(".json") and FILE_ID.fullmatch(n[:-5])),
                     reverse=newest_first)
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        found = []
        for file_id in ids:
            if len(found) > limit:
                break
            try:
                found.append(self.get(file_id))
            except (FileNotFound, ValueError, TypeError):
                continue  # deleted meanwhile, or not a record of ours
        return found[:limit], len(found) > limit

    def content_path(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.jsonl"

    def delete(self, file_id: str) -> TrainingFile:
        record = self.get(file_id)
        with store_writes(self.folder):
            self._record_path(file_id).unlink(missing_ok=True)  # unlisted first
            self.content_path(file_id).unlink(missing_ok=True)
        return record

    def _record_path(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.json"


def _clean(filename: str) -> str:
    """The name as the caller gave it, without any folder, and of bounded length."""
    name = Path(filename.replace("\\", "/")).name or "upload.jsonl"
    return name[:MAX_FILENAME_CHARS]


def _short(error: Exception) -> str:
    return str(error)[:200]
