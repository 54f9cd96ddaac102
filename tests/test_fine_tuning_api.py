"""Fine-tuning through OpenAI's API, with the `openai` client against the real server and its
fine-tuning worker: examples uploaded, a job created and followed through its events until it
succeeds, and the fine-tuned model served at once through chat completions; a second job
queues behind the first and can be cancelled; a file the job cannot use fails it, naming the
line; a bad request is a 400 naming the field. (A short job: training on two CPU cores takes
seconds a step.)"""

import json
import time

import openai
import pytest

from bench.server_process import start_server, stop_server

ADMIN = "fine-tuning-admin-key"
BASE = "SmolLM2-135M-Instruct"
EXAMPLES = [{"prompt": f"Card for person {i}:", "completion": f" CARD {i}"} for i in range(16)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("fine-tuning")
    (root / "admin.key").write_text(ADMIN)
    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
         "--adapters", str(root / "store"), "--admin-api-key-file", str(root / "admin.key"),
         "--watch-interval", "0.5", "--enforce-eager"], root / "server.log",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"})  # the suite's other servers are up too
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, timeout=120, max_retries=0)


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def wait_for(client, job_id: str, states: set[str], seconds: float = 600):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status} after {seconds} s")


def test_a_job_trains_an_adapter_that_serves_at_once(client):
    training_file = client.files.create(file=("cards.jsonl", jsonl(EXAMPLES)),
                                        purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=training_file.id, suffix="cards", seed=0,
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        extra_body={"prompt_length": 8, "rank": 8, "task_text": "Write the card."})
    assert job.status == "validating_files" and job.model == BASE
    # A second job queues behind the first, and is cancelled there.
    second = client.fine_tuning.jobs.create(model=BASE, training_file=training_file.id)
    assert wait_for(client, job.id, {"running"}).status == "running"
    assert wait_for(client, second.id, {"queued"}, 120).status == "queued"
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"

    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.hyperparameters.n_epochs == 2 and done.trained_tokens > 0
    metrics = [e.data for e in reversed(list(client.fine_tuning.jobs.list_events(job.id)))
               if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(m["train_loss"] > 0 for m in metrics)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [done.fine_tuned_model]
    assert done.id in [j.id for j in client.fine_tuning.jobs.list()]

    # Served at once: in /v1/models, and answering.
    deadline = time.monotonic() + 30
    while done.fine_tuned_model not in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Card for person 3:"}],
        max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    assert client.fine_tuning.jobs.retrieve(second.id).status == "cancelled"


def test_a_file_the_job_cannot_use_fails_it_naming_the_line(client):
    bad = client.files.create(file=("bad.jsonl", jsonl([
        {"prompt": "Hi", "completion": " there"}, {"prompt": "No answer"}])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=bad.id)
    failed = wait_for(client, job.id, {"failed", "succeeded"})
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert "line 2" in failed.error.message and bad.id in failed.error.message


@pytest.mark.parametrize("fields, message", [
    ({"model": "gpt-4o-mini"}, "not this server's base model"),
    ({"training_file": "file-" + "0" * 24}, "does not exist"),
    ({"hyperparameters": {"n_epochs": 0}}, "n_epochs"),
    ({"suffix": "a/b"}, "suffix"),
    ({"extra_body": {"top_k": 3}}, "top_k 3 is more than num_experts 2"),
])
def test_bad_job_requests_get_a_400_that_names_the_field(client, fields, message):
    training_file = client.files.create(file=("t.jsonl", jsonl([
        {"prompt": "a", "completion": "b"}])), purpose="fine-tune")
    arguments = {"model": BASE, "training_file": training_file.id, **fields}
    with pytest.raises(openai.BadRequestError, match=message):
        client.fine_tuning.jobs.create(**arguments)


def test_fine_tuning_needs_the_admin_key(server):
    other = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        other.files.list()
