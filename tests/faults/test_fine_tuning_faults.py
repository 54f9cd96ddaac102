"""The fine-tuning worker's faults, made for real against a real server and its supervised
worker, with the `openai` client: the worker killed inside its checkpoint write (a failpoint)
and SIGKILLed mid-job (as the OOM killer would), each started again and its job resumed to
success; a full disk at a checkpoint (the store on a size-limited tmpfs) pausing the job until
it is resumed; a torn event line followed by more events; a paused job cancelled while no worker
runs it; a creation retried with one Idempotency-Key, after a full disk refused the first.

Mounting needs root (as on the build machines); elsewhere the module is skipped, saying why."""

import json
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from bench.residency import metric
from bench.server_process import start_server
from conftest import PARALLEL
from helpers import fill_volume, mount_tmpfs, stop_later, unmount
from ptmoe_serve.train.jobs import JOBS_FOLDER

ADMIN = "fine-tuning-faults-admin-key"
BASE = "SmolLM2-135M-Instruct"
EXAMPLES = [{"prompt": f"Card for person {i}:", "completion": f" CARD {i}"} for i in range(16)]
FINAL = {"succeeded", "failed", "cancelled"}
# Four steps an epoch, a training checkpoint each step, a checkpoint adapter each epoch.
JOB = {"hyperparameters": {"n_epochs": 3, "batch_size": 4},
       "extra_body": {"prompt_length": 4, "rank": 4}}
CHECKPOINT_WRITE = "staged:checkpoint.safetensors"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tuning-faults")
    store = root / "store"
    store.mkdir()
    mount_tmpfs(store, "16m")
    (root / "admin.key").write_text(ADMIN)
    yield {"root": root, "store": store}
    unmount(store)


@pytest.fixture(scope="module")
def server(lab, model_dir):
    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
         "--adapters", str(lab["store"]), "--admin-api-key-file", str(lab["root"] / "admin.key"),
         "--watch-interval", "0.5", "--enforce-eager", "--fine-tune-niceness", "0",
         "--fine-tune-threads", "1" if PARALLEL else "2"],
        lab["root"] / "server.log",
        # The first worker to write a training checkpoint is killed inside the write.
        env={"PTMOE_FAILPOINT": f"{CHECKPOINT_WRITE}@{lab['root'] / 'failpoint-fired'}"})
    yield running
    stop_later(running)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def training_file(client) -> str:
    data = b"".join(json.dumps(e).encode() + b"\n" for e in EXAMPLES)
    return client.files.create(file=("cards.jsonl", data), purpose="fine-tune").id


def create_job(client, training_file: str, **fields):
    return client.fine_tuning.jobs.create(model=BASE, training_file=training_file, seed=0,
                                          **{**JOB, **fields})


def wait_for(client, job_id: str, states: set[str], seconds: float = 300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.25)
    raise AssertionError(f"{job_id} still {job.status} after {seconds} s")


def events(client, job_id: str) -> list:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def steps(client, job_id: str) -> list[int]:
    return [e.data["step"] for e in events(client, job_id) if e.type == "metrics"]


def wait_for_step(client, job_id: str, step: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not any(s >= step for s in steps(client, job_id)):
        assert time.monotonic() < deadline, steps(client, job_id)
        time.sleep(0.1)


def worker_process(server) -> psutil.Process:
    """The fine-tuning worker the server runs now."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(server.process.pid).children(recursive=True):
            try:
                if "fine-tune-worker" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError("no fine-tuning worker runs")


def restarts(server) -> float:
    return metric(server.url, "ptmoe_fine_tune_worker_restarts_total")


def leftovers(lab, job_id: str) -> list[str]:
    folder = lab["store"] / JOBS_FOLDER / job_id
    return [p.name for p in folder.rglob(".*.tmp")] if folder.exists() else []


def answers(client, model: str) -> bool:
    """Whether `model` is served: a completion under it answers."""
    return client.completions.create(model=model, prompt="Card for person 3:", max_tokens=4,
                                     temperature=0).model == model


def test_a_worker_killed_inside_its_checkpoint_write_is_replaced_and_the_job_succeeds(
        server, client, training_file, lab):
    job = create_job(client, training_file, suffix="killed-writing")
    done = wait_for(client, job.id, FINAL)
    assert done.status == "succeeded", done.error
    assert (lab["root"] / "failpoint-fired").exists()  # the first worker died in the write
    assert restarts(server) == 1
    # The killed write's staged file was removed by the worker that took the job over.
    assert leftovers(lab, job.id) == []
    assert steps(client, job.id)[-1] == 12
    assert answers(client, done.fine_tuned_model)


def test_a_worker_killed_mid_job_is_replaced_and_its_job_resumes_from_its_checkpoint(
        server, client, training_file):
    worker, before = worker_process(server), restarts(server)
    # First in line for the kernel's OOM killer, before the engine.
    assert open(f"/proc/{worker.pid}/oom_score_adj").read().strip() == "1000"
    job = create_job(client, training_file, suffix="oom-killed")
    wait_for_step(client, job.id, 6)
    os.kill(worker.pid, signal.SIGKILL)
    done = wait_for(client, job.id, FINAL)
    assert done.status == "succeeded", done.error
    assert restarts(server) == before + 1 and worker_process(server).pid != worker.pid
    history = events(client, job.id)
    resumed = [e.message for e in history].index(
        "Fine-tuning job resumed from its last checkpoint")
    after = [e.data["step"] for e in history[resumed:] if e.type == "metrics"]
    # From the step after the last checkpoint it wrote (one each step), not from the start.
    assert 6 <= after[0] - 1 and after == list(range(after[0], 13)), after
    assert answers(client, done.fine_tuned_model)


def test_a_full_disk_at_a_checkpoint_pauses_the_job_until_it_is_resumed(
        server, client, training_file, lab):
    job = create_job(client, training_file, suffix="full-disk")
    wait_for_step(client, job.id, 2)
    # Room for the events of a step, not for a training checkpoint (about 40 KB).
    filler = fill_volume(lab["store"], leave=16 * 1024)
    try:
        paused = wait_for(client, job.id, {"paused", *FINAL}, 120)
        assert paused.status == "paused", paused
        cause = events(client, job.id)[-1]
        assert cause.level == "error" and "is full (No space left on device)" in cause.message
        assert f"/v1/fine_tuning/jobs/{job.id}/resume" in cause.message
        assert leftovers(lab, job.id) == []
        time.sleep(3)  # it stays paused: nothing retries it behind the owner's back
        assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
        # Serving goes on meanwhile.
        assert answers(client, BASE)
        # A crash mid-append left a torn line, its fragment ending in "}".
        with open(lab["store"] / JOBS_FOLDER / job.id / "events.jsonl", "a") as f:
            f.write('{"object": "fine_tuning.job.event", "data": {"step": 99}')
        assert events(client, job.id)[-1].id == cause.id
    finally:
        filler.unlink()
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(client, job.id, FINAL)
    assert done.status == "succeeded", done.error
    history = events(client, job.id)
    assert [e.data["step"] for e in history if e.type == "metrics"][-1] == 12
    assert all(e.data["step"] != 99 for e in history if e.type == "metrics")
    lines = (lab["store"] / JOBS_FOLDER / job.id / "events.jsonl").read_text().splitlines()
    assert all(json.loads(line)["object"] == "fine_tuning.job.event" for line in lines)


def test_a_paused_job_cancelled_with_no_worker_leaves_nothing(server, client, training_file,
                                                               lab):
    job = create_job(client, training_file, suffix="cancelled")
    wait_for_step(client, job.id, 5)  # past the first epoch: a checkpoint adapter is served
    client.fine_tuning.jobs.pause(job.id)
    assert wait_for(client, job.id, {"paused", *FINAL}, 60).status == "paused"
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    model = checkpoint.fine_tuned_model_checkpoint
    assert answers(client, model)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"  # at once: no worker holds it
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model, prompt="x", max_tokens=1)
    assert not (lab["store"] / model).exists()
    assert not (lab["store"] / JOBS_FOLDER / job.id / "checkpoint").exists()
    assert events(client, job.id)[-1].message == "The job was cancelled"


def test_a_creation_retried_with_one_idempotency_key_makes_one_job(server, client,
                                                                   training_file, lab):
    key = {"Idempotency-Key": "create-cards-1"}
    before = {job.id for job in client.fine_tuning.jobs.list(limit=100)}
    filler = fill_volume(lab["store"])
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            create_job(client, training_file, extra_headers=key)
        assert refused.value.status_code == 507
        assert refused.value.body["code"] == "store_full"
        assert {job.id for job in client.fine_tuning.jobs.list(limit=100)} == before
    finally:
        filler.unlink()
    first = create_job(client, training_file, extra_headers=key)
    again = create_job(client, training_file, extra_headers=key)
    assert again.id == first.id
    assert {job.id for job in client.fine_tuning.jobs.list(limit=100)} == before | {first.id}
    assert create_job(client, training_file,
                      extra_headers={"Idempotency-Key": "create-cards-2"}).id != first.id
    for job in client.fine_tuning.jobs.list(limit=100):
        client.fine_tuning.jobs.cancel(job.id)
    too_long = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json={
        "model": BASE, "training_file": training_file},
        headers={"authorization": f"Bearer {ADMIN}", "Idempotency-Key": "k" * 300})
    assert too_long.status_code == 400, too_long.text
