"""Fine-tuning jobs as OpenAI's fine-tuning API describes them, kept in the adapter store so
that every server and fine-tuning worker over the store sees them: a folder per job holding its
record (OpenAI's job object), its events (JSON lines) and its training checkpoint.

A job goes validating_files -> queued -> running -> succeeded, or ends failed or cancelled; a
queued or running job can be paused (by its owner, or by a full disk) and resumed.
Whoever works on a job (validating or training it) holds its claim, a file lock: a worker that
dies lets go of it, and the next worker to claim the job resumes it from its checkpoint. Record
changes and event appends are made under a second, short lock (tried for a bounded time), so a
cancel and a worker's progress never lose each other's change.

Every change is whole or absent after a crash: a job is staged in a folder of its own and
renamed into place with its record and first event, records are replaced atomically, and an
event line cut short by a crash is cut off before the next is appended (and skipped when
read)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ptmoe_serve.disk import (DEFAULT_LOCK_TIMEOUT, StoreBusy, file_lock, fsync_dir,
                              store_writes, write_atomically)

logger = logging.getLogger(__name__)

JOBS_FOLDER = ".ptmoe-jobs"
JOB_ID_PREFIX = "ftjob-"
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
PAUSABLE = ("queued", "running")
CHECKPOINTS = "checkpoint"
# Record fields of this server's own, never shown: the order of creation, the runs its worker
# died in (MAX_INTERRUPTED_RUNS in a row fail the job).
PRIVATE_FIELDS = ("created_ns", "interrupted_runs")
# Where a job is staged until it is whole, the Idempotency-Key index, and a marker per job not
# yet ended (what a worker looks at every few seconds, instead of every job).
STAGING_PREFIX = ".creating-"
KEYS_FOLDER = ".idempotency"
ACTIVE_FOLDER = ".active"
# How far back an events page looks for its cursor, a block at a time.
EVENTS_BLOCK = 64 * 1024
# Temporary files older than this are a crashed writer's, removed by the worker at start.
ORPHAN_SECONDS = 3600
# How long an Idempotency-Key returns its job (OpenAI's keys last a day).
KEY_SECONDS = 24 * 3600


class JobNotFound(KeyError):
    pass


class JobStateError(ValueError):
    """A change the job's status does not allow (a 400)."""


class FineTuningJobs:
    def __init__(self, store_root: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        # Made by the first job: a read-only store has none.
        self.folder = store_root / JOBS_FOLDER
        self.lock_timeout = lock_timeout

    # -- records ------------------------------------------------------------------------------

    def create(self, record: dict, idempotency_key: str | None = None) -> dict:
        """A new job from OpenAI's job fields (model, training_file, hyperparameters, ...);
        the record as stored, at validating_files. With an `idempotency_key` seen before, the
        job that key created: a retried request never makes a second job."""
        with store_writes(self.folder):
            if idempotency_key is None:
                return self._create(record)
            keys = self.folder / KEYS_FOLDER
            keys.mkdir(exist_ok=True)
            key_path = keys / hashlib.sha256(idempotency_key.encode()).hexdigest()
            with file_lock(self.folder / "create.lock", self.lock_timeout,
                           "the fine-tuning jobs' index"):
                try:
                    return self.get(key_path.read_text())
                except (FileNotFoundError, JobNotFound):
                    pass  # a new key, or one whose job was never made whole
                job_id = self._new_id()
                write_atomically(key_path, job_id.encode())  # before the job: never one unnamed
                return self._create(record, job_id)

    def _create(self, record: dict, job_id: str | None = None) -> dict:
        """The job staged in a folder of its own, then renamed into place whole: a failure
        before the rename leaves no job; after it, the job is complete."""
        job_id = job_id or self._new_id()
        now = time.time_ns()
        record = {"object": "fine_tuning.job", "id": job_id, "created_at": now // 10**9,
                  "status": "validating_files", "error": None, "fine_tuned_model": None,
                  "finished_at": None, "result_files": [], "trained_tokens": None,
                  "estimated_finish": None, "integrations": None,
                  "organization_id": "ptmoe_serve", **record, "created_ns": now}
        staging = self.folder / f"{STAGING_PREFIX}{job_id}"
        try:
            staging.mkdir()
            write_atomically(staging / "job.json", json.dumps(record).encode())
            _append_line(staging / "events.jsonl", _event(f"Created fine-tuning job: {job_id}"))
            active = self.folder / ACTIVE_FOLDER
            active.mkdir(exist_ok=True)
            (active / job_id).touch()  # before the job: a job is never missed
            os.rename(staging, self.job_folder(job_id))
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            (self.folder / ACTIVE_FOLDER / job_id).unlink(missing_ok=True)
            raise
        return record

    @staticmethod
    def _new_id() -> str:
        """Ordered by creation (milliseconds, then 12 random hex digits), so that a listing of
        names is the jobs in order, without reading their records."""
        return f"{JOB_ID_PREFIX}{time.time_ns() // 10**6:012x}{secrets.token_hex(6)}"

    def get(self, job_id: str) -> dict:
        if not job_id.startswith(JOB_ID_PREFIX) or not job_id[len(JOB_ID_PREFIX):].isalnum():
            raise JobNotFound(job_id)
        try:
            return json.loads(self._record_path(job_id).read_bytes())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def page(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Up to `limit` jobs, newest first, after the job `after`; whether more follow. Only
        the page's records are read: the folder's names are the index."""
        ids = sorted((name for name in _names(self.folder) if name.startswith(JOB_ID_PREFIX)),
                     reverse=True)
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        records = self._records(ids, limit + 1)
        return records[:limit], len(records) > limit

    def active(self) -> list[dict]:
        """The jobs not yet ended, oldest first (what a worker looks at): a marker each."""
        ids = sorted(_names(self.folder / ACTIVE_FOLDER))
        jobs = self._records(ids, len(ids))
        for job in jobs:
            if job["status"] in FINAL:  # ended by a process that died before its marker went
                (self.folder / ACTIVE_FOLDER / job["id"]).unlink(missing_ok=True)
        return [job for job in jobs if job["status"] not in FINAL]

    def _records(self, ids: list[str], count: int) -> list[dict]:
        """The records of the first `count` of `ids` that are jobs."""
        found = []
        for job_id in ids:
            if len(found) == count:
                break
            try:
                found.append(self.get(job_id))
            except (JobNotFound, ValueError):
                continue  # removed meanwhile, or not a job of ours
        return found

    def ending_with(self, tail: str) -> dict | None:
        """The job whose id ends with `tail` (an adapter name holds its last 12 digits)."""
        ids = [n for n in _names(self.folder) if n.startswith(JOB_ID_PREFIX) and n.endswith(tail)]
        found = self._records(ids, 1)
        return found[0] if found else None

    def mark_active(self) -> None:
        """A marker for every job not yet ended, made by a store written before markers were
        (a worker does this at start: every record is read, once)."""
        names = [n for n in _names(self.folder) if n.startswith(JOB_ID_PREFIX)]
        for job in self._records(names, len(names)):
            if job["status"] not in FINAL:
                (self.folder / ACTIVE_FOLDER).mkdir(exist_ok=True)
                (self.folder / ACTIVE_FOLDER / job["id"]).touch()

    def update(self, job_id: str, change: Callable[[dict], None]) -> dict:
        """Read, change and write a job's record under its record lock; the record as written."""
        with self._record_lock(job_id):
            record = self.get(job_id)
            change(record)
            write_atomically(self._record_path(job_id), json.dumps(record).encode())
            return record

    # -- events ---------------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info",
                  data: dict | None = None) -> None:
        """Append an event, whole: under the record lock, after cutting off a line a crash left
        unfinished."""
        with self._record_lock(job_id):
            _append_line(self.job_folder(job_id) / "events.jsonl", _event(message, level, data))

    def events(self, job_id: str) -> list[dict]:
        """A job's events, oldest first; a line a crash cut short or damaged is skipped."""
        return list(reversed(list(self.newest_events(job_id))))

    def events_page(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Up to `limit` events, newest first, after the event `after`; whether more follow.
        Read from the file's end a block at a time: a page near the end costs a page."""
        events = self.newest_events(job_id)
        if after is not None:
            for event in events:
                if event["id"] == after:
                    break
        page = list(itertools.islice(events, limit + 1))
        return page[:limit], len(page) > limit

    def newest_events(self, job_id: str) -> Iterator[dict]:
        """A job's events, newest first, read backwards from the end of its file; a line a
        crash cut short or damaged is skipped."""
        self.get(job_id)
        try:
            f = open(self.job_folder(job_id) / "events.jsonl", "rb")
        except FileNotFoundError:
            return
        with f:
            end, rest = f.seek(0, os.SEEK_END), b""
            while end > 0:
                start = max(0, end - EVENTS_BLOCK)
                f.seek(start)
                lines = (f.read(end - start) + rest).split(b"\n")
                end, rest = start, lines.pop(0) if start > 0 else b""
                for line in reversed(lines):
                    event = _parse_event(line)
                    if event is not None:
                        yield event

    # -- checkpoints ---------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, model: str, step: int, metrics: dict,
                       keep: int) -> list[str]:
        """Record a servable adapter of the job at `step` (OpenAI's checkpoint object; one
        recorded for the same step before, by a worker that died, is replaced) and keep the
        last `keep`; the models of the checkpoints no longer kept."""
        checkpoint = {"object": "fine_tuning.job.checkpoint",
                      "id": f"ftckpt-{secrets.token_hex(12)}", "created_at": int(time.time()),
                      "fine_tuned_model_checkpoint": model, "fine_tuning_job_id": job_id,
                      "step_number": step, "metrics": {**metrics, "step": step}}
        return self._change_checkpoints(job_id, lambda kept: [
            *(c for c in kept if c["step_number"] != step), checkpoint][-keep:])

    def drop_checkpoints(self, job_id: str) -> list[str]:
        """Forget every checkpoint of the job; their models."""
        return self._change_checkpoints(job_id, lambda kept: [])

    def forget_checkpoints(self, job_id: str) -> list[str]:
        """Nothing of a cancelled job stays: its training checkpoint is removed and its
        checkpoint adapters forgotten; their names, for the caller to unload with purge."""
        shutil.rmtree(self.job_folder(job_id) / CHECKPOINTS, ignore_errors=True)
        return self.drop_checkpoints(job_id)

    def checkpoints(self, job_id: str) -> list[dict]:
        """A job's checkpoints, oldest first."""
        self.get(job_id)
        try:
            return json.loads((self.job_folder(job_id) / "checkpoints.json").read_bytes())
        except FileNotFoundError:
            return []

    def _change_checkpoints(self, job_id: str, change: Callable[[list], list]) -> list[str]:
        with self._record_lock(job_id):
            before = self.checkpoints(job_id)
            after = change(before)
            write_atomically(self.job_folder(job_id) / "checkpoints.json",
                             json.dumps(after).encode())
        kept = {c["fine_tuned_model_checkpoint"] for c in after}
        return [c["fine_tuned_model_checkpoint"] for c in before
                if c["fine_tuned_model_checkpoint"] not in kept]

    # -- claims and cancelling ----------------------------------------------------------------

    @contextmanager
    def claimed(self, job_id: str) -> Iterator[bool]:
        """Try once to hold the job's claim for the block: whether this process got it."""
        with ExitStack() as held:
            try:
                held.enter_context(file_lock(self.job_folder(job_id) / "claim.lock", 0,
                                             f"fine-tuning job {job_id}"))
            except StoreBusy:
                yield False
                return
            yield True

    def cancel(self, job_id: str) -> dict:
        """Cancel a job: at once if no one works on it, else by a marker its worker sees
        before its next step. A finished job stays as it ended."""
        record = self.get(job_id)
        if record["status"] in FINAL:
            return record
        return self._ask(job_id, "cancel", lambda: self.finish(job_id, "cancelled"))

    def cancel_requested(self, job_id: str) -> bool:
        return (self.job_folder(job_id) / "cancel").exists()

    def pause(self, job_id: str) -> dict:
        """Pause a queued or running job: at once if no one works on it, else by a marker its
        worker sees before its next step (it then keeps its last checkpoint)."""
        record = self.get(job_id)
        if record["status"] == "paused":
            return record
        if record["status"] not in PAUSABLE:
            raise JobStateError(f"fine-tuning job {job_id} is {record['status']}: only a "
                                "queued or running job can be paused")
        return self._ask(job_id, "pause", lambda: self.paused(job_id, "The job was paused"))

    def _ask(self, job_id: str, marker: str, at_once: Callable[[], dict]) -> dict:
        """Leave `marker` for the job's worker to see before its next step, and act `at_once`
        where no one works on the job; the record."""
        with store_writes(self.folder):
            (self.job_folder(job_id) / marker).touch()
        with self.claimed(job_id) as mine:
            if mine:
                return at_once()
        return self.get(job_id)

    def pause_requested(self, job_id: str) -> bool:
        return (self.job_folder(job_id) / "pause").exists()

    def paused(self, job_id: str, message: str, level: str = "info",
               requested: bool = True) -> dict:
        """Record a job as paused, with an event saying why, if it is still to be: a resume
        that came meanwhile (which removed the marker) wins unless the pause was not
        `requested` (a full disk pauses a job whoever asked)."""
        moved = []

        def change(record: dict) -> None:
            if record["status"] in PAUSABLE and (self.pause_requested(job_id) or not requested):
                record.update(status="paused", interrupted_runs=0)
                moved.append(True)

        with store_writes(self.folder):
            record = self.update(job_id, change)
            if moved:
                self.add_event(job_id, message, level=level)
        return record

    def resume(self, job_id: str) -> dict:
        """Resume a paused job (it goes back to the queue and continues from its last
        checkpoint); a pause asked for but not yet made is withdrawn."""
        resumed = []

        def change(record: dict) -> None:
            if record["status"] != "paused" and not self.pause_requested(job_id):
                raise JobStateError(f"fine-tuning job {job_id} is {record['status']}: only a "
                                    "paused job can be resumed")
            (self.job_folder(job_id) / "pause").unlink(missing_ok=True)
            if record["status"] == "paused":
                record.update(status="queued")
                resumed.append(True)

        self.get(job_id)
        with store_writes(self.folder):
            record = self.update(job_id, change)
            if resumed:
                self.add_event(job_id, "The job was resumed: it continues from its last "
                                       "checkpoint")
        return record

    def begin_run(self, job_id: str) -> int:
        """Count a run of the job about to start; the runs before it that ended with their
        worker dead (in a row: a run that ends in order sets the count back to 0)."""
        before = []

        def change(record: dict) -> None:
            before.append(record.get("interrupted_runs", 0))
            record["interrupted_runs"] = before[0] + 1

        self.update(job_id, change)
        return before[0]

    def end_run(self, job_id: str) -> None:
        """The run in progress ended in order (stopped, paused or finished)."""
        self.update(job_id, lambda record: record.update(interrupted_runs=0))

    def remove_orphans(self) -> None:
        """What crashed writers left (a worker runs this at start): jobs staged and never
        made whole, and temporary files, once older than ORPHAN_SECONDS (a writer on another
        replica may still be at work on a newer one); and Idempotency-Keys past KEY_SECONDS."""
        now = time.time()
        for path, age in [*((p, ORPHAN_SECONDS) for p in [
                              *self.folder.glob(f"{STAGING_PREFIX}*"),
                              *self.folder.glob("*/.*.tmp"),
                              *self.folder.glob(f"*/{CHECKPOINTS}/.*.tmp")]),
                          *((p, KEY_SECONDS) for p in self.folder.glob(f"{KEYS_FOLDER}/*"))]:
            try:
                if path.lstat().st_mtime < now - age:
                    logger.warning("removing what a crashed writer left: %s", path)
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            except OSError:
                continue

    def finish(self, job_id: str, status: str, **fields) -> dict:
        """End a job (once: a job already ended stays as it ended)."""
        ended = []

        def change(record: dict) -> None:
            if record["status"] not in FINAL:
                record.update(status=status, finished_at=int(time.time()), **fields)
                ended.append(True)

        record = self.update(job_id, change)
        if ended:
            (self.job_folder(job_id) / "pause").unlink(missing_ok=True)
            (self.folder / ACTIVE_FOLDER / job_id).unlink(missing_ok=True)
            message = {"succeeded": "The job has successfully completed",
                       "cancelled": "The job was cancelled"}.get(status)
            error = (record.get("error") or {}).get("message", "")
            self.add_event(job_id, message or f"The job failed: {error}",
                           level="error" if status == "failed" else "info")
        return record

    def job_folder(self, job_id: str) -> Path:
        return self.folder / job_id

    def _record_path(self, job_id: str) -> Path:
        return self.job_folder(job_id) / "job.json"

    @contextmanager
    def _record_lock(self, job_id: str) -> Iterator[None]:
        if not self.job_folder(job_id).is_dir():
            raise JobNotFound(job_id)
        with file_lock(self.job_folder(job_id) / "record.lock", self.lock_timeout,
                       f"fine-tuning job {job_id}"):
            yield


def shown(record: dict) -> dict:
    """A job's record as OpenAI's job object: without this server's own fields."""
    return {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _parse_event(line: bytes) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("id"), str) else None


def _event(message: str, level: str = "info", data: dict | None = None) -> dict:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{secrets.token_hex(12)}",
            "created_at": int(time.time()), "level": level, "message": message,
            "data": data, "type": "metrics" if data is not None else "message"}


def _append_line(path: Path, value: dict) -> None:
    """Append `value` as one JSON line, whole: a line left unfinished by a crash is cut off
    first, and a write that fails (a full disk) is cut back, so the next append starts clean."""
    line = (json.dumps(value) + "\n").encode()
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(max(0, end - 64 * 1024))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                end = (end - len(tail) + cut + 1) if cut >= 0 else max(0, end - len(tail))
                logger.warning("cutting off an unfinished line at the end of %s", path)
                f.truncate(end)
        try:
            f.seek(end)
            f.write(line)
            f.flush()
        except OSError:
            f.truncate(end)
            raise
