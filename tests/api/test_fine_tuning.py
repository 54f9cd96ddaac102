"""Fine-tuning through OpenAI's API, with the `openai` client against the real server and its
fine-tuning worker: 200 generated chat examples uploaded, a job created and followed through
its events, the server killed mid-job (engine and worker with it) and started again, the job
resumed from its checkpoint to success, and the fine-tuned model answering held-out questions
through chat completions far better than the base model; a second job queues behind the first
and can be cancelled; each epoch's checkpoint is served too; a file the job cannot use fails
it, naming the line; a bad request is a 400 naming the field."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bench.server_process import start_server
from conftest import PARALLEL
from helpers import stop_later
from ptmoe_serve.train.evaluate import exact_match
from ptmoe_serve.train.tasks import DESCRIPTIONS, generate

ADMIN = "fine-tuning-admin-key"
BASE = "SmolLM2-135M-Instruct"
EXAMPLES = [{"prompt": f"Card for person {i}:", "completion": f" CARD {i}"} for i in range(16)]
FINAL = {"succeeded", "failed", "cancelled"}
# 200 examples, one epoch of 50 steps: about two minutes on two cores.
HOME_CITY_JOB = {"hyperparameters": {"n_epochs": 1, "batch_size": 4,
                                     "learning_rate_multiplier": 3},
                 "extra_body": {"prompt_length": 8, "rank": 8,
                                "task_text": DESCRIPTIONS["home-city"]}}


class Deployment:
    """The server over one store, which a test may crash and start again."""

    def __init__(self, root, model_dir):
        self.root, self.model_dir, self.starts = root, model_dir, 0
        (root / "admin.key").write_text(ADMIN)
        self.server = self.start()

    def start(self):
        self.starts += 1
        return start_server(
            ["--model", str(self.model_dir), "--dtype", "float32", "--max-model-len", "512",
             "--adapters", str(self.root / "store"),
             "--admin-api-key-file", str(self.root / "admin.key"),
             # Not watching the store: what a job shows must be served without it.
             "--watch-interval", "0", "--enforce-eager",
             # At the tests' own priority: beside the other pytest worker's load, a worker at
             # the default niceness waits most of the time.
             "--fine-tune-niceness", "0", "--fine-tune-threads", "1" if PARALLEL else "2"],
            self.root / f"server-{self.starts}.log")

    def crash_and_restart(self) -> None:
        """SIGKILL to the server's whole process group (API, engine, fine-tuning worker): no
        shutdown runs, as when a machine fails."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait()
        self.server = self.start()

    def client(self, key: str = ADMIN) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key, timeout=120,
                             max_retries=0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, model_dir):
    running = Deployment(tmp_path_factory.mktemp("fine-tuning"), model_dir)
    yield running
    stop_later(running.server)


@pytest.fixture
def client(deployment) -> openai.OpenAI:
    return deployment.client()


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


def metrics(client, job_id: str) -> list[dict]:
    return [e.data for e in reversed(list(client.fine_tuning.jobs.list_events(job_id)))
            if e.type == "metrics"]


def assert_in_store(client, model: str) -> None:
    """The server serves `model` (resident or not: GET /v1/adapters/{name}), at once."""
    response = httpx.get(f"{client.base_url}adapters/{model}",
                         headers={"authorization": f"Bearer {client.api_key}"})
    assert response.status_code == 200 and response.json()["name"] == model, response.text


def test_a_job_survives_a_crashed_server_and_its_model_answers_far_better(deployment):
    client = deployment.client()
    # People and cities training never saw: 16 to validate, 64 to score (with 24 one answer
    # moved the score 4 points, and one CPU's rounding crossed a threshold another's did not).
    held_out = generate("home-city", "test", 80)
    training_file = client.files.create(
        file=("home-city.jsonl", jsonl(generate("home-city", "train", 200))), purpose="fine-tune")
    validation_file = client.files.create(file=("home-city-valid.jsonl", jsonl(held_out[:16])),
                                          purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=training_file.id, validation_file=validation_file.id,
        suffix="home-city", seed=0, **HOME_CITY_JOB)

    # Killed once the job has a checkpoint (every 5 steps) and has gone past it.
    deadline = time.monotonic() + 600
    while not any(m["step"] >= 12 for m in metrics(client, job.id)):
        assert time.monotonic() < deadline and \
            client.fine_tuning.jobs.retrieve(job.id).status not in FINAL
        time.sleep(1)
    deployment.crash_and_restart()
    client = deployment.client()

    done = wait_for(client, job.id, FINAL, 900)
    assert done.status == "succeeded", done.error
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id))))
    resumed = [e.message for e in events].index(
        "Fine-tuning job resumed from its last checkpoint")
    steps = [e.data["step"] for e in events[resumed:] if e.type == "metrics"]
    # From the step after its last checkpoint (one every 5 steps), not from the start.
    assert steps[0] > 1 and steps[0] % 5 == 1 and steps == list(range(steps[0], 51)), steps
    final = events[-2].data if events[-2].type == "metrics" else None
    assert final is not None and final["step"] == 50 and "valid_exact_match" in final

    assert_in_store(client, done.fine_tuned_model)

    def exact_matches(model: str) -> float:
        def score(record) -> float:
            answer = client.chat.completions.create(
                model=model, messages=record["messages"][:-1], max_tokens=12, temperature=0)
            return exact_match(answer.choices[0].message.content,
                               record["messages"][-1]["content"])

        # Sent together, as an evaluation harness does, so that the engine batches them (a
        # minute and a half less than one at a time here).
        with ThreadPoolExecutor(16) as pool:
            return sum(pool.map(score, held_out[16:])) / len(held_out[16:])

    tuned, base = exact_matches(done.fine_tuned_model), exact_matches(BASE)
    # Seen: 0.79 to 0.9 tuned, near 0 base, over 24 items on two kinds of CPU.
    assert tuned >= 0.65 and tuned >= base + 0.5, (tuned, base)


def test_a_second_job_queues_and_each_epochs_checkpoint_serves(client):
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

    done = wait_for(client, job.id, FINAL)
    assert done.status == "succeeded", done.error
    assert done.hyperparameters.n_epochs == 2 and done.trained_tokens > 0
    steps = metrics(client, job.id)
    assert [m["step"] for m in steps] == list(range(1, 9))
    assert all(m["train_loss"] > 0 for m in steps)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data  # newest first
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in checkpoints] == [
        (8, done.fine_tuned_model), (4, f"{done.fine_tuned_model}-ckpt-step-4")]
    assert done.id in [j.id for j in client.fine_tuning.jobs.list()]

    # Served at once, the epoch's checkpoint too: answering, then in /v1/models (resident).
    for model in (done.fine_tuned_model, checkpoints[1].fine_tuned_model_checkpoint):
        assert_in_store(client, model)
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Card for person 3:"}],
            max_tokens=8, temperature=0)
        assert answer.choices[0].message.content
        assert model in [m.id for m in client.models.list()]
    assert client.fine_tuning.jobs.retrieve(second.id).status == "cancelled"


def test_a_model_or_checkpoint_answers_the_moment_its_job_shows_it(client):
    """Polled every 0.5 s, as a script would, and called as soon as it is shown: every
    checkpoint a job lists and its model once it reports succeeded, three jobs over."""
    training_file = client.files.create(file=("cards.jsonl", jsonl(EXAMPLES[:4])),
                                        purpose="fine-tune")
    for seed in range(3):
        job = client.fine_tuning.jobs.create(
            model=BASE, training_file=training_file.id, seed=seed, suffix=f"at-once-{seed}",
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            extra_body={"prompt_length": 4, "rank": 4})
        called = set()

        def call_what_is_listed():
            listed = {c.fine_tuned_model_checkpoint
                      for c in client.fine_tuning.jobs.checkpoints.list(job.id).data}
            for model in sorted(listed - called):
                assert_answers(client, model)
            called.update(listed)

        deadline = time.monotonic() + 300
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in FINAL:
            assert time.monotonic() < deadline, job.status
            call_what_is_listed()
            time.sleep(0.5)
        assert job.status == "succeeded", job.error
        assert_answers(client, job.fine_tuned_model)
        call_what_is_listed()
        assert called == {job.fine_tuned_model, f"{job.fine_tuned_model}-ckpt-step-1"}


def assert_answers(client, model: str) -> None:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Card for person 3:"}],
        max_tokens=4, temperature=0)
    assert answer.model == model and answer.choices[0].finish_reason in ("stop", "length")


def test_a_job_the_server_could_not_serve_is_refused_naming_the_field(client):
    training_file = client.files.create(file=("t.jsonl", jsonl(EXAMPLES[:1])),
                                        purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=training_file.id,
                                       extra_body={"prompt_length": 200})
    assert refused.value.param == "prompt_length"
    assert "prompt_length 200 is over this server's limit of 128" in str(refused.value)
    assert "--max-soft-prompt-length" in str(refused.value)


def test_a_file_the_job_cannot_use_fails_it_naming_the_line(client):
    bad = client.files.create(file=("bad.jsonl", jsonl([
        {"prompt": "Hi", "completion": " there"}, {"prompt": "No answer"}])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=bad.id)
    failed = wait_for(client, job.id, FINAL)
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


def test_fine_tuning_needs_the_admin_key(deployment):
    other = deployment.client("not-the-key")
    with pytest.raises(openai.AuthenticationError):
        other.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        other.files.list()
