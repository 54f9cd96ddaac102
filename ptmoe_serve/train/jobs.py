"""Fine-tuning jobs as OpenAI's fine-tuning API describes them, kept in the adapter store so
that every server and fine-tuning worker over the store sees them: a folder per job holding its
record (OpenAI's job object), its events (JSON lines) and its training checkpoint.

A job goes validating_files -> queued -> running -> succeeded, or ends failed or cancelled.
Whoever works on a job (validating or training it) holds its claim, a file lock: a worker that
dies lets go of it, and the next worker to claim the job resumes it from its checkpoint. Record
changes are made under a second, short lock, so a cancel and a worker's progress never lose
each other's change."""

from __future__ import annotations

import fcntl
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ptmoe_serve.disk import store_writes, write_atomically

JOBS_FOLDER = ".ptmoe-jobs"
JOB_ID_PREFIX = "ftjob-"
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
CHECKPOINTS = "checkpoint"


class JobNotFound(KeyError):
    pass


class FineTuningJobs:
    def __init__(self, store_root: Path):
        # Made by the first job: a read-only store has none.
        self.folder = store_root / JOBS_FOLDER

    # -- records ------------------------------------------------------------------------------

    def create(self, record: dict) -> dict:
        """A new job from OpenAI's job fields (model, training_file, hyperparameters, ...);
        the record as stored, at validating_files."""
        job_id = f"{JOB_ID_PREFIX}{secrets.token_hex(12)}"
        now = time.time_ns()
        record = {"object": "fine_tuning.job", "id": job_id, "created_at": now // 10**9,
                  "status": "validating_files", "error": None, "fine_tuned_model": None,
                  "finished_at": None, "result_files": [], "trained_tokens": None,
                  "estimated_finish": None, "integrations": None,
                  "organization_id": "ptmoe_serve", **record, "created_ns": now}
        with store_writes(self.folder):
            self.job_folder(job_id).mkdir()
            write_atomically(self._record_path(job_id), json.dumps(record).encode())
            self.add_event(job_id, f"Created fine-tuning job: {job_id}")
        return record

    def get(self, job_id: str) -> dict:
        if not job_id.startswith(JOB_ID_PREFIX) or not job_id[len(JOB_ID_PREFIX):].isalnum():
            raise JobNotFound(job_id)
        try:
            return json.loads(self._record_path(job_id).read_bytes())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def list(self) -> list[dict]:
        """Every job, oldest first."""
        jobs = []
        for folder in self.folder.glob(f"{JOB_ID_PREFIX}*"):
            try:
                jobs.append(self.get(folder.name))
            except (JobNotFound, ValueError):
                continue  # being created, or not a job of ours
        return sorted(jobs, key=lambda job: (job["created_ns"], job["id"]))

    def update(self, job_id: str, change: Callable[[dict], None]) -> dict:
        """Read, change and write a job's record under its record lock; the record as written."""
        with self._lock(job_id, "record.lock"):
            record = self.get(job_id)
            change(record)
            write_atomically(self._record_path(job_id), json.dumps(record).encode())
            return record

    # -- events ---------------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info",
                  data: dict | None = None) -> None:
        event = {"object": "fine_tuning.job.event", "id": f"ftevent-{secrets.token_hex(12)}",
                 "created_at": int(time.time()), "level": level, "message": message,
                 "data": data, "type": "metrics" if data is not None else "message"}
        with open(self.job_folder(job_id) / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def events(self, job_id: str) -> list[dict]:
        """A job's events, oldest first."""
        self.get(job_id)
        try:
            text = (self.job_folder(job_id) / "events.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

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

    def checkpoints(self, job_id: str) -> list[dict]:
        """A job's checkpoints, oldest first."""
        self.get(job_id)
        try:
            return json.loads((self.job_folder(job_id) / "checkpoints.json").read_bytes())
        except FileNotFoundError:
            return []

    def _change_checkpoints(self, job_id: str, change: Callable[[list], list]) -> list[str]:
        with self._lock(job_id, "record.lock"):
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
        """Try to hold the job's claim for the block: whether this process got it."""
        with open(self.job_folder(job_id) / "claim.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def cancel(self, job_id: str) -> dict:
        """Cancel a job: at once if no one works on it, else by a marker its worker sees
        before its next step. A finished job stays as it ended."""
        record = self.get(job_id)
        if record["status"] in FINAL:
            return record
        with store_writes(self.folder):
            (self.job_folder(job_id) / "cancel").touch()
        with self.claimed(job_id) as mine:
            if mine:
                return self.finish(job_id, "cancelled")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return (self.job_folder(job_id) / "cancel").exists()

    def finish(self, job_id: str, status: str, **fields) -> dict:
        """End a job (once: a job already ended stays as it ended)."""
        ended = []

        def change(record: dict) -> None:
            if record["status"] not in FINAL:
                record.update(status=status, finished_at=int(time.time()), **fields)
                ended.append(True)

        record = self.update(job_id, change)
        if ended:
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
    def _lock(self, job_id: str, name: str) -> Iterator[None]:
        with open(self.job_folder(job_id) / name, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
