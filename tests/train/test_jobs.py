"""Fine-tuning job records on real files: events survive a line a crash cut short, a creation is
whole or absent (a file-size limit refusing its writes leaves no job), an Idempotency-Key makes
one job of a retried creation, pause and resume follow the job's status, what crashed writers
left is removed once it is old, and jobs, events and files are read a page at a time."""

import json
import os
import subprocess
import sys
import time

import pytest

from ptmoe_serve.train import jobs as jobs_module
from ptmoe_serve.train.files import TrainingFiles
from ptmoe_serve.train.jobs import (ACTIVE_FOLDER, JOBS_FOLDER, FineTuningJobs, JobNotFound,
                                    JobStateError, shown)

FIELDS = {"model": "base", "training_file": "file-" + "0" * 24, "seed": 0}


@pytest.fixture
def jobs(tmp_path):
    return FineTuningJobs(tmp_path / "store")


def events_file(jobs: FineTuningJobs, job_id: str):
    return jobs.job_folder(job_id) / "events.jsonl"


def test_a_line_a_crash_cut_short_is_cut_off_before_the_next_event(jobs):
    job = jobs.create(FIELDS)
    jobs.add_event(job["id"], "Step 1")
    # A crash mid-append, its fragment ending in "}" as a nested object's would.
    with open(events_file(jobs, job["id"]), "a") as f:
        f.write('{"object": "fine_tuning.job.event", "data": {"step": 2}')
    assert [e["message"] for e in jobs.events(job["id"])] == [
        f"Created fine-tuning job: {job['id']}", "Step 1"]
    jobs.add_event(job["id"], "Step 2")
    jobs.add_event(job["id"], "Step 3")
    assert [e["message"] for e in jobs.events(job["id"])][1:] == ["Step 1", "Step 2", "Step 3"]
    assert events_file(jobs, job["id"]).read_text().count("\n") == 4


def test_a_damaged_event_line_is_skipped_and_the_rest_read(jobs):
    job = jobs.create(FIELDS)
    with open(events_file(jobs, job["id"]), "a") as f:
        f.write('not json\n[1, 2]\n{"id": 3}\n\n')
    jobs.add_event(job["id"], "after")
    assert [e["message"] for e in jobs.events(job["id"])][1:] == ["after"]


def test_a_creation_the_disk_refuses_leaves_no_job_and_a_retry_makes_one(jobs):
    """A file-size limit (EFBIG, as ENOSPC) fails the record's write: no job, nothing staged;
    the same Idempotency-Key then makes the job, once."""
    jobs.folder.mkdir(parents=True)
    script = ("import resource, sys; from pathlib import Path\n"
              "from ptmoe_serve.train.jobs import FineTuningJobs\n"
              "from ptmoe_serve.disk import StoreFull\n"
              "jobs = FineTuningJobs(Path(sys.argv[1]))\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
              "try:\n    jobs.create({'model': 'base', 'pad': 'x' * 500}, 'key-1')\n"
              "except StoreFull as e:\n    print('refused:', e)\n")
    told = subprocess.run([sys.executable, "-c", script, str(jobs.folder.parent)],
                          capture_output=True, text=True, check=True).stdout
    assert "refused: the adapter store" in told and "is full" in told, told
    assert jobs.page(None, 10) == ([], False)
    assert [p.name for p in jobs.folder.iterdir() if p.name.startswith("ftjob-")
            or p.name.startswith(".creating-")] == []
    first = jobs.create(FIELDS, "key-1")
    again = jobs.create(FIELDS, "key-1")
    time.sleep(0.002)
    other = jobs.create(FIELDS, "key-2")
    assert again["id"] == first["id"] != other["id"]
    assert [job["id"] for job in jobs.page(None, 10)[0]] == [other["id"], first["id"]]
    assert len(jobs.events(first["id"])) == 1


def test_pause_and_resume_follow_the_jobs_status(jobs):
    job = jobs.create(FIELDS)
    with pytest.raises(JobStateError, match="only a queued or running job can be paused"):
        jobs.pause(job["id"])  # still validating
    jobs.update(job["id"], lambda record: record.update(status="queued"))
    with pytest.raises(JobStateError, match="only a paused job can be resumed"):
        jobs.resume(job["id"])
    # No worker holds it: paused at once, and again is no change.
    assert jobs.pause(job["id"])["status"] == "paused"
    assert jobs.pause(job["id"])["status"] == "paused"
    assert jobs.resume(job["id"])["status"] == "queued"
    assert not jobs.pause_requested(job["id"])
    messages = [e["message"] for e in jobs.events(job["id"])]
    assert messages[1:] == ["The job was paused", "The job was resumed: it continues from its "
                                                  "last checkpoint"]
    # A worker holds it: the pause is asked for, and a resume before it is made withdraws it.
    jobs.update(job["id"], lambda record: record.update(status="running"))
    with jobs.claimed(job["id"]) as mine:
        assert mine
        assert jobs.pause(job["id"])["status"] == "running" and jobs.pause_requested(job["id"])
        assert jobs.resume(job["id"])["status"] == "running"
        assert not jobs.pause_requested(job["id"])
    jobs.finish(job["id"], "succeeded")
    with pytest.raises(JobStateError, match="is succeeded"):
        jobs.pause(job["id"])
    with pytest.raises(JobNotFound):
        jobs.pause("ftjob-" + "0" * 24)


def test_interrupted_runs_count_in_a_row_and_are_not_shown(jobs):
    job = jobs.create(FIELDS)
    assert [jobs.begin_run(job["id"]) for _ in range(3)] == [0, 1, 2]
    jobs.end_run(job["id"])
    assert jobs.begin_run(job["id"]) == 0
    assert "interrupted_runs" in jobs.get(job["id"])
    assert "interrupted_runs" not in shown(jobs.get(job["id"]))
    assert "created_ns" not in shown(jobs.get(job["id"]))


def test_what_crashed_writers_left_is_removed_once_old(jobs):
    job = jobs.create(FIELDS)
    folder = jobs.job_folder(job["id"])
    (folder / "checkpoint").mkdir()
    left = [jobs.folder / ".creating-ftjob-aaaa", folder / ".job.json.1234abcd.tmp",
            folder / "checkpoint" / ".checkpoint.safetensors.1234abcd.tmp"]
    left[0].mkdir()
    for path in left[1:]:
        path.write_bytes(b"x")
    fresh = folder / ".job.json.5678abcd.tmp"
    fresh.write_bytes(b"x")
    hour_ago = time.time() - 3700
    for path in left:
        os.utime(path, (hour_ago, hour_ago))
    kept_key, old_key = jobs.create(FIELDS, "recent"), jobs.create(FIELDS, "a day old")
    keys = sorted((jobs.folder / ".idempotency").iterdir(), key=lambda p: p.read_text())
    day_ago = time.time() - 25 * 3600
    os.utime(next(p for p in keys if p.read_text() == old_key["id"]), (day_ago, day_ago))
    jobs.remove_orphans()
    assert not any(path.exists() for path in left)
    assert fresh.exists() and jobs.get(job["id"])["id"] == job["id"]
    assert jobs.create(FIELDS, "recent")["id"] == kept_key["id"]
    assert jobs.create(FIELDS, "a day old")["id"] != old_key["id"]  # the key had expired
    assert json.loads((folder / "job.json").read_text())["status"] == "validating_files"
    assert (jobs.folder.parent / JOBS_FOLDER).is_dir()


def test_jobs_are_paged_newest_first_reading_only_the_page(jobs):
    made = []
    for _ in range(5):
        made.append(jobs.create(FIELDS)["id"])
        time.sleep(0.002)  # ordered by the millisecond
    page, more = jobs.page(None, 2)
    assert [job["id"] for job in page] == made[:2:-1] and more
    page, more = jobs.page(made[3], 2)
    assert [job["id"] for job in page] == [made[2], made[1]] and more
    assert [job["id"] for job in jobs.page(made[1], 2)[0]] == [made[0]]
    assert jobs.page(made[0], 2) == ([], False) and jobs.page("ftjob-unknown", 2) == ([], False)
    # A page reads its own records: one no longer readable is skipped, not a failure.
    (jobs.job_folder(made[4]) / "job.json").unlink()
    assert [job["id"] for job in jobs.page(None, 2)[0]] == [made[3], made[2]]


def test_a_worker_looks_only_at_jobs_not_yet_ended(jobs):
    running = jobs.create(FIELDS)
    time.sleep(0.002)
    ended = jobs.create(FIELDS)
    jobs.finish(ended["id"], "failed", error={"code": "x", "message": "y", "param": None})
    assert [job["id"] for job in jobs.active()] == [running["id"]]
    assert sorted(p.name for p in (jobs.folder / ACTIVE_FOLDER).iterdir()) == [running["id"]]
    # A store from before the markers: made once, at a worker's start.
    (jobs.folder / ACTIVE_FOLDER / running["id"]).unlink()
    assert jobs.active() == []
    jobs.mark_active()
    assert [job["id"] for job in jobs.active()] == [running["id"]]


def test_events_are_paged_from_the_end_across_blocks(jobs, monkeypatch):
    monkeypatch.setattr(jobs_module, "EVENTS_BLOCK", 300)  # a line or two a block
    job = jobs.create(FIELDS)
    for step in range(1, 31):
        jobs.add_event(job["id"], f"Step {step}", data={"step": step})
    page, more = jobs.events_page(job["id"], None, 4)
    assert [e["data"]["step"] for e in page] == [30, 29, 28, 27] and more
    page, more = jobs.events_page(job["id"], page[-1]["id"], 25)
    assert [e["data"]["step"] for e in page] == list(range(26, 1, -1)) and more
    page, more = jobs.events_page(job["id"], page[-1]["id"], 25)
    assert [e["message"] for e in page] == ["Step 1", f"Created fine-tuning job: {job['id']}"]
    assert not more
    assert len(jobs.events(job["id"])) == 31


def test_files_are_paged_in_either_order(tmp_path):
    files = TrainingFiles(tmp_path / "store")
    made = []
    for i in range(4):
        made.append(files.add(f"{i}.jsonl", "fine-tune", b'{"prompt": "a"}\n').id)
        time.sleep(0.002)  # ordered by the millisecond
    newest, more = files.page(None, 3)
    assert [f.id for f in newest] == made[:0:-1] and more
    assert [f.id for f in files.page(made[1], 3)[0]] == [made[0]]
    oldest, more = files.page(None, 2, newest_first=False)
    assert [f.id for f in oldest] == made[:2] and more
    assert [f.id for f in files.page(made[1], 5, newest_first=False)[0]] == made[2:]
