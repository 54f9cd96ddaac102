"""Fine-tuning through the API on the serving machine: how long a job takes (examples, steps,
seconds), how much better its model answers held-out questions than the base model, and what
a job in progress costs serving, as the same load's output tokens per second while a job
trains over the mean of the load run idle before and after (same run, same server).

The server runs in its default configuration but for `--dtype` (float32 by default here),
its worker with it (half the cores, lower priority). The job: the generated `home-city` chat task, 200 examples, one epoch of batch 4.

    python -m bench.fine_tune --out bench/results/fine_tune.json --save-adapter adapters/home-city
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import openai
from transformers import AutoTokenizer

from bench.loadgen import run_workload
from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from bench.workload import CORPUS, WorkloadSpec, make_workload
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.base_model import default_cache_dir
from ptmoe_serve.train.evaluate import exact_match
from ptmoe_serve.train.tasks import DESCRIPTIONS, generate

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "trainer", "bench/fine_tune.py")

BASE = "SmolLM2-135M-Instruct"
ADMIN = "bench-admin-key"
LOAD_ADAPTER = Path("adapters/arithmetic")  # the load's requests name a shipped adapter
JOB = {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 3},
       "extra_body": {"prompt_length": 8, "rank": 8, "task_text": DESCRIPTIONS["home-city"]}}
FINAL = {"succeeded", "failed", "cancelled"}


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def wait_until(client: openai.OpenAI, job_id: str, done, seconds: float = 3600):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id}: {job.status} after {seconds} s")


def step_times(client: openai.OpenAI, job_id: str) -> list[tuple[int, int]]:
    """(step, created_at) of each training step's event."""
    return [(e.data["step"], e.created_at)
            for e in reversed(list(client.fine_tuning.jobs.list_events(job_id)))
            if e.type == "metrics"]


def served_exact_match(client: openai.OpenAI, model: str, records: list[dict]) -> float:
    right = 0.0
    for record in records:
        answer = client.chat.completions.create(
            model=model, messages=record["messages"][:-1], max_tokens=12, temperature=0)
        right += exact_match(answer.choices[0].message.content,
                             record["messages"][-1]["content"])
    return right / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path,
                        default=default_cache_dir() / "models" / BASE)
    parser.add_argument("--dtype", default="float32",
                        help="the server's (bfloat16 crawls on a CPU without native bf16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per load run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fine_tune.json"))
    parser.add_argument("--save-adapter", type=Path, default=None,
                        help="copy the fine-tuned adapter here, with its job's record")
    args = parser.parse_args()

    spec = WorkloadSpec(num_adapters=1, num_requests=args.requests, prompt_tokens=64,
                        output_tokens=32, concurrency=args.concurrency)
    requests = make_workload(spec, AutoTokenizer.from_pretrained(args.model).encode(CORPUS * 4))
    train = generate("home-city", "train", 200)
    held_out = generate("home-city", "test", 56)
    validation, questions = held_out[:16], held_out[16:]

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        (root / "admin.key").write_text(ADMIN)
        shutil.copytree(LOAD_ADAPTER, root / "store" / LOAD_ADAPTER.name)
        server = start_server(["--model", str(args.model), "--adapters", str(root / "store"),
                               "--admin-api-key-file", str(root / "admin.key"),
                               "--dtype", args.dtype],
                              root / "server.log")
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, timeout=600)

            def load(label: str) -> dict:
                return asyncio.run(run_workload(server.url, requests, spec,
                                                lambda i: LOAD_ADAPTER.name, progress=label))

            load("warm-up")
            idle_before = load("idle")
            files = [client.files.create(file=(name, jsonl(records)), purpose="fine-tune").id
                     for name, records in (("train.jsonl", train), ("valid.jsonl", validation))]

            def create(seed: int):
                return client.fine_tuning.jobs.create(
                    model=BASE, training_file=files[0], validation_file=files[1],
                    suffix="home-city", seed=seed, **JOB)

            started = time.monotonic()
            job = wait_until(client, create(0).id, lambda j: j.status in FINAL)
            seconds = time.monotonic() - started
            if job.status != "succeeded":
                raise SystemExit(f"the job {job.status}: {job.error}")
            alone = step_times(client, job.id)
            while job.fine_tuned_model not in [m.id for m in client.models.list()]:
                time.sleep(0.5)
            tuned = served_exact_match(client, job.fine_tuned_model, questions)
            base = served_exact_match(client, BASE, questions)

            # The same job again, under the load, then cancelled.
            second = create(1)
            wait_until(client, second.id, lambda j: step_times(client, j.id))
            training = load("while training")
            during = step_times(client, second.id)
            client.fine_tuning.jobs.cancel(second.id)
            wait_until(client, second.id, lambda j: j.status in FINAL)
            idle_after = load("idle again")
            record = client.fine_tuning.jobs.retrieve(job.id).model_dump()
            if args.save_adapter:
                args.save_adapter.mkdir(parents=True, exist_ok=True)
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copy(root / "store" / job.fine_tuned_model / name, args.save_adapter)
                (args.save_adapter / "training.json").write_text(json.dumps(
                    {"steps": alone[-1][0], "examples": len(train), "job": record,
                     "metrics": [e.data for e in client.fine_tuning.jobs.list_events(job.id)
                                 if e.type == "metrics"][::-1]}, indent=2) + "\n")
        finally:
            stop_server(server)

    idle = (idle_before["output_tokens_per_second"] + idle_after["output_tokens_per_second"]) / 2
    per_step_alone = (alone[-1][1] - alone[0][1]) / max(1, alone[-1][0] - alone[0][0])
    per_step_loaded = (during[-1][1] - during[0][1]) / max(1, during[-1][0] - during[0][0]) \
        if len(during) > 1 else None
    result = {
        **provenance("python -m bench.fine_tune " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)),
        "job": {"examples": len(train), "steps": alone[-1][0], "seconds": round(seconds, 1),
                "seconds_per_step": round(per_step_alone, 2),
                "seconds_per_step_under_load": per_step_loaded and round(per_step_loaded, 2),
                "hyperparameters": JOB},
        "held_out_exact_match": {"fine_tuned": tuned, "base": base, "questions": len(questions)},
        "serving": {"idle_before": idle_before, "while_training": training,
                    "idle_after": idle_after,
                    "output_tokens_per_second_ratio": training["output_tokens_per_second"] / idle},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("job", "held_out_exact_match")}, indent=2))
    print("serving while training / idle:",
          round(result["serving"]["output_tokens_per_second_ratio"], 3))


if __name__ == "__main__":
    main()
