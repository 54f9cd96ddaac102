"""Train adapters on the generated tasks and score them through the servers: the base model,
plain prompt tuning (N=1), LoRA of about the same size and PT-MoE, each task's held-out split.

    python -m bench.quality --work /tmp/quality --steps 80 --ship adapters

Data comes from `ptmoe-serve make-tasks`; adapters from `ptmoe-serve train` (PT and PT-MoE
with the same settings but the number of experts, LoRA with `--method lora`); scores from
`ptmoe-serve eval`'s functions, greedy, through this server (base, PT, PT-MoE) and vLLM's own
server with `--enable-lora` (LoRA), both in float32 on the same engine settings. Finished
training runs are kept in --work and not redone, so an interrupted run picks up where it was.
--ship copies the PT-MoE adapters (and their training.json) into a store folder."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from bench.systems import GIB, SystemConfig, vllm_command
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model
from ptmoe_serve.train.evaluate import evaluate_models, read_records
from ptmoe_serve.train.spec import TrainSettings
from ptmoe_serve.train.tasks import DESCRIPTIONS, METRICS, TASKS, write_task
from ptmoe_serve.train.trainer import train

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "trainer", "bench/quality.py", "bench/systems.py")

# Each method's trainer settings beyond the shared ones; its name is its folder and the suffix
# of its served name.
METHODS = {"pt": {"num_experts": 1}, "ptmoe": {}, "lora": {"method": "lora"}}


def train_all(args, model_dir: Path, work: Path) -> dict[str, dict]:
    timings = {}
    for task in args.tasks:
        data = work / "data" / task
        if not (data / "test.jsonl").exists():
            write_task(task, data, args.train_size, args.test_size, args.seed)
        for method, overrides in METHODS.items():
            output = work / method / task
            if (output / "training.json").exists():
                continue
            started = time.perf_counter()
            summary = train(TrainSettings(
                model_dir=model_dir, base_name=DEFAULT_MODEL_NAME, data=data / "train.jsonl",
                output=output, task_text=DESCRIPTIONS[task], steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                checkpoint_every=args.steps, **overrides))
            timings[f"{method}/{task}"] = {"seconds": time.perf_counter() - started,
                                           "final_loss": summary["losses"][-1]}
    return timings


def score_ptmoe_server(args, model_dir: Path, work: Path, config: SystemConfig) -> dict:
    """Base model, PT and PT-MoE adapters through this server."""
    store = work / "served"
    shutil.rmtree(store, ignore_errors=True)
    for task in args.tasks:
        for method in ("pt", "ptmoe"):
            shutil.copytree(work / method / task, store / f"{task}-{method}")
    server = start_server(["--model", str(model_dir), "--adapters", str(store), "--dtype",
                           "float32", "--max-model-len", "1024", "--watch-interval", "0",
                           "--served-model-name", DEFAULT_MODEL_NAME],
                          work / "ptmoe-server.log", env=config.engine_env())
    try:
        return {task: evaluate_models(
            server.url, [DEFAULT_MODEL_NAME, f"{task}-pt", f"{task}-ptmoe"],
            read_records(work / "data" / task / "test.jsonl"), args.max_tokens)
            for task in args.tasks}
    finally:
        stop_server(server)


def score_lora_server(args, model_dir: Path, work: Path, config: SystemConfig) -> dict:
    """The LoRA baselines through vLLM's own server, loaded by its filesystem resolver."""
    folder = work / "lora"
    rank = max(json.loads((folder / task / "training.json").read_text())["lora_rank"]
               for task in args.tasks)
    server = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "1024",
         "--kv-cache-memory-bytes", str(int(config.kv_cache_gib * GIB)), "--enforce-eager",
         "--served-model-name", DEFAULT_MODEL_NAME, "--enable-lora", "--max-lora-rank",
         str(rank), "--max-loras", str(len(args.tasks))],
        work / "lora-server.log", command=vllm_command(),
        env={**config.engine_env(), "VLLM_PLUGINS": "lora_filesystem_resolver",
             "VLLM_LORA_RESOLVER_CACHE_DIR": str(folder),
             "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        return {task: evaluate_models(server.url, [task],
                                      read_records(work / "data" / task / "test.jsonl"),
                                      args.max_tokens)[task]
                for task in args.tasks}
    finally:
        stop_server(server)


def table(results: dict) -> str:
    lines = ["| task (metric) | base | PT (N=1) | LoRA | PT-MoE |", "| --- | --- | --- | --- | --- |"]
    for task, rows in results.items():
        metric = METRICS[task]
        values = [rows[m][metric] for m in ("base", "pt", "lora", "ptmoe")]
        lines.append(f"| {task} ({metric.replace('_', ' ')}) | "
                     + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="data, runs and logs go here")
    # home-city's shipped adapter comes from fine-tuning through the API (bench/fine_tune.py)
    parser.add_argument("--tasks", nargs="+", default=["extractive-qa", "arithmetic",
                                                       "contact-card"], choices=list(TASKS))
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--ship", type=Path, help="copy the PT-MoE adapters into this store")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = parser.parse_args()

    model_dir = ensure_default_model(default_cache_dir())
    work = args.work.resolve()
    config = SystemConfig(model_dir=model_dir, base_name=DEFAULT_MODEL_NAME, work_dir=work)
    timings = train_all(args, model_dir, work)
    served = score_ptmoe_server(args, model_dir, work, config)
    lora = score_lora_server(args, model_dir, work, config)
    results = {task: {"base": served[task][DEFAULT_MODEL_NAME], "pt": served[task][f"{task}-pt"],
                      "lora": lora[task], "ptmoe": served[task][f"{task}-ptmoe"]}
               for task in args.tasks}
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance("python -m bench.quality " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("work", "out", "ship", "tasks"))),
        "results": results, "training": timings, "table": table(results)}, indent=2) + "\n")
    if args.ship:
        for task in args.tasks:
            target = args.ship / task
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors", "training.json"):
                shutil.copy2(work / "ptmoe" / task / name, target / name)


if __name__ == "__main__":
    main()
