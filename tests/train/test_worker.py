"""The fine-tuning worker over a store: it validates a job's files (naming the bad line), runs
the oldest job while the next queues, trains on the real model, and writes the adapter into the
store, where a server following the store finds it; a cancelled job leaves nothing behind."""

import asyncio
import json

import pytest
import torch

from ptmoe_serve.adapters.format import adapter_files, read_adapter
from ptmoe_serve.adapters.manager import AdapterManager
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore
from ptmoe_serve.train.files import TrainingFiles
from ptmoe_serve.train.jobs import FineTuningJobs
from ptmoe_serve.train.spec import Hyperparameters
from ptmoe_serve.train.worker import FineTuningWorker, adapter_name

EXAMPLES = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": str(i)}]} for i in range(8)]


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def worker(store, model_dir):
    return FineTuningWorker(store, model_dir, "SmolLM2-135M-Instruct")


def new_job(store, data: bytes, **fields) -> dict:
    file_id = TrainingFiles(store).add("train.jsonl", "fine-tune", data).id
    return FineTuningJobs(store).create({
        "model": "SmolLM2-135M-Instruct", "training_file": file_id, "validation_file": None,
        "seed": 0, "suffix": "numbers",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"},
        "adapter": {"prompt_length": 4, "rank": 4}, **fields})


def test_a_job_is_validated_queued_trained_and_served_from_the_store(store, worker):
    jobs = FineTuningJobs(store)
    validation = TrainingFiles(store).add("valid.jsonl", "fine-tune", jsonl(EXAMPLES[:3])).id
    first = new_job(store, jsonl(EXAMPLES), validation_file=validation,
                    hyperparameters={"n_epochs": 2, "batch_size": 4})
    second = new_job(store, jsonl(EXAMPLES))
    follower = AdapterManager(AdapterRegistry(576, 2048, torch.device("cpu")), AdapterStore(store))
    follower.start()
    assert worker.run_once()
    # The oldest ran; the other waits its turn, validated.
    done, waiting = jobs.get(first["id"]), jobs.get(second["id"])
    assert done["status"] == "succeeded" and waiting["status"] == "queued"
    assert done["hyperparameters"] == {"n_epochs": 2, "batch_size": 4,
                                       "learning_rate_multiplier": 1.0}
    name = done["fine_tuned_model"]
    assert name == adapter_name("SmolLM2-135M-Instruct", "numbers", first["id"])
    adapter = read_adapter(store / name)
    assert adapter.config.prompt_length == 4 and adapter.config.rank == 4
    steps = [e["data"] for e in jobs.events(first["id"]) if e["type"] == "metrics"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["train_loss"] > 0 for s in steps)
    assert all(0 <= s["train_mean_token_accuracy"] <= 1 for s in steps)
    # Validation at each epoch's end: loss, token accuracy, exact match.
    assert [s["step"] for s in steps if "valid_loss" in s] == [2, 4]
    assert all(s["valid_loss"] > 0 and 0 <= s["valid_exact_match"] <= 1 for s in steps[1::2])
    assert done["trained_tokens"] > 0
    # A checkpoint at each epoch's end, the last the model itself, each an adapter served.
    checkpoints = jobs.checkpoints(first["id"])
    assert [(c["step_number"], c["fine_tuned_model_checkpoint"]) for c in checkpoints] == [
        (2, f"{name}-ckpt-step-2"), (4, name)]
    assert checkpoints[1]["metrics"] == steps[-1]
    asyncio.run(follower.sync_store())
    assert name in follower.catalog and f"{name}-ckpt-step-2" in follower.catalog
    assert not torch.equal(read_adapter(store / f"{name}-ckpt-step-2").experts_a,
                           adapter.experts_a)


def test_a_job_keeps_its_last_three_checkpoints(store, worker):
    jobs = FineTuningJobs(store)
    job = new_job(store, jsonl(EXAMPLES[:2]), hyperparameters={"n_epochs": 5, "batch_size": 2})
    worker.run_once()
    name = jobs.get(job["id"])["fine_tuned_model"]
    kept = [f"{name}-ckpt-step-3", f"{name}-ckpt-step-4", name]
    assert [c["fine_tuned_model_checkpoint"] for c in jobs.checkpoints(job["id"])] == kept
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted(kept)


def test_a_stopped_worker_leaves_its_job_running_and_the_next_resumes_it(store, model_dir):
    jobs = FineTuningJobs(store)
    job = new_job(store, jsonl(EXAMPLES), hyperparameters={"n_epochs": 2, "batch_size": 4})
    stopping = FineTuningWorker(store, model_dir, "SmolLM2-135M-Instruct",
                                stop=lambda: len(jobs.events(job["id"])) > 4)
    stopping.run_once()  # validated, then stopped after its first epoch
    assert jobs.get(job["id"])["status"] == "running"
    FineTuningWorker(store, model_dir, "SmolLM2-135M-Instruct").run_once()
    assert jobs.get(job["id"])["status"] == "succeeded"
    events = jobs.events(job["id"])
    assert [e["data"]["step"] for e in events if e["data"]] == [1, 2, 3, 4]
    assert any("resumed from its last checkpoint" in e["message"] for e in events)


@pytest.mark.parametrize("data, message", [
    (jsonl(EXAMPLES[:2]) + b'{"prompt": "a"}\n', "line 3: each line needs 'messages'"),
    (jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), "line 1: a chat example must end"),
])
def test_a_file_the_job_cannot_use_fails_it_naming_the_line(store, worker, data, message):
    job = new_job(store, data)
    worker.run_once()
    failed = FineTuningJobs(store).get(job["id"])
    assert failed["status"] == "failed" and failed["error"]["param"] == "training_file"
    assert message in failed["error"]["message"]
    assert job["training_file"] in failed["error"]["message"]


def test_a_job_with_a_missing_file_or_bad_hyperparameters_fails(store, worker):
    jobs = FineTuningJobs(store)
    missing = new_job(store, jsonl(EXAMPLES), training_file="file-" + "0" * 24)
    epochs = new_job(store, jsonl(EXAMPLES), hyperparameters={"n_epochs": 500})
    worker.run_once()
    assert "does not exist" in jobs.get(missing["id"])["error"]["message"]
    assert "n_epochs must be 1 to 50" in jobs.get(epochs["id"])["error"]["message"]


def test_a_cancelled_job_ends_and_leaves_no_adapter(store, worker):
    jobs = FineTuningJobs(store)
    job = new_job(store, jsonl(EXAMPLES))
    worker.run_once()  # validated, trained
    queued = new_job(store, jsonl(EXAMPLES))
    assert jobs.cancel(queued["id"])["status"] == "cancelled"  # no one works on it: at once
    worker.run_once()
    assert jobs.get(queued["id"])["status"] == "cancelled"
    served = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    assert served == [jobs.get(job["id"])["fine_tuned_model"]]
    # A finished job stays as it ended.
    assert jobs.cancel(job["id"])["status"] == "succeeded"


def test_auto_hyperparameters_follow_the_data():
    assert Hyperparameters().resolved(200).model_dump() == {
        "n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert Hyperparameters(n_epochs="auto", batch_size=2).resolved(3).model_dump() == {
        "n_epochs": 10, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert adapter_name("org/Model:1", "my suffix", "ftjob-abc123") == "ft-org-Model-1-my-suffix-abc123"


def test_a_job_cancelled_while_training_stops_before_its_next_step(store, worker):
    jobs = worker.jobs
    job = new_job(store, jsonl(EXAMPLES), hyperparameters={"n_epochs": 3, "batch_size": 4})
    add_event = jobs.add_event

    def cancel_after_the_first_epoch(job_id, message, level="info", data=None):
        add_event(job_id, message, level, data)
        if data is not None and data["step"] == 2:
            assert jobs.cancel(job_id)["status"] == "running"  # the worker holds it

    jobs.add_event = cancel_after_the_first_epoch
    worker.run_once()
    ended = jobs.get(job["id"])
    assert ended["status"] == "cancelled" and ended["fine_tuned_model"] is None
    assert [e["data"]["step"] for e in jobs.events(job["id"]) if e["data"]] == [1, 2]
    assert not (jobs.job_folder(job["id"]) / "checkpoint").exists()
    # The epoch's checkpoint adapter, written before the cancel was seen, is gone too.
    assert jobs.checkpoints(job["id"]) == []
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == []


def test_a_job_paused_while_training_keeps_its_checkpoint_and_resumes_to_the_end(store, worker):
    jobs = worker.jobs
    job = new_job(store, jsonl(EXAMPLES), hyperparameters={"n_epochs": 3, "batch_size": 4})
    add_event = jobs.add_event

    def pause_after_the_first_epoch(job_id, message, level="info", data=None):
        add_event(job_id, message, level, data)
        if data is not None and data["step"] == 2:
            assert jobs.pause(job_id)["status"] == "running"  # the worker holds it

    jobs.add_event = pause_after_the_first_epoch
    worker.run_once()
    assert jobs.get(job["id"])["status"] == "paused"
    assert not worker.run_once()  # a paused job waits for its resume
    jobs.add_event = add_event
    assert jobs.resume(job["id"])["status"] == "queued"
    worker.run_once()
    done = jobs.get(job["id"])
    assert done["status"] == "succeeded"
    events = jobs.events(job["id"])
    assert [e["data"]["step"] for e in events if e["data"]] == [1, 2, 3, 4, 5, 6]
    messages = [e["message"] for e in events]
    assert "The job was paused: it continues from its last checkpoint when resumed" in messages
    assert "Fine-tuning job resumed from its last checkpoint" in messages


def test_a_job_whose_worker_died_three_times_in_a_row_fails_saying_so(store, worker):
    jobs = worker.jobs
    job = new_job(store, jsonl(EXAMPLES))
    jobs.update(job["id"], lambda record: record.update(
        status="running", interrupted_runs=3,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}))
    worker.run_once()
    failed = jobs.get(job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_died"
    assert "died 3 times in a row" in failed["error"]["message"]
    assert [e["data"] for e in jobs.events(job["id"]) if e["data"]] == []


def test_checkpoint_adapters_no_job_keeps_are_removed_when_a_worker_starts(store, worker):
    jobs = worker.jobs
    job = new_job(store, jsonl(EXAMPLES))
    worker.run_once()
    name = jobs.get(job["id"])["fine_tuned_model"]
    files = adapter_files(read_adapter(store / name))
    # A worker killed between writing a checkpoint adapter and recording it, and a job
    # cancelled while no worker ran that had written one.
    cancelled = new_job(store, jsonl(EXAMPLES))
    jobs.cancel(cancelled["id"])
    strays = [f"{name}-ckpt-step-1",
              f"{adapter_name('SmolLM2-135M-Instruct', 'numbers', cancelled['id'])}-ckpt-step-1"]
    for stray in strays:
        worker.store.write(stray, *files)
    worker.remove_orphans()
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [name]
