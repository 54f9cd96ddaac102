"""Start-up with many adapters in the store: the server's time to ready with none and with N
(the paper's shape at the model's H), from the process's launch to /health answering and
from the log's "ready in" line (the project's own start-up, after vLLM's), the memory of the
server's processes once ready (the API process; the engine's, which hold the banks), and the
time of /v1/models and of an adapter's first request (read from the store) and second.
The run keeps vLLM's compile cache in a folder of its own, so its first start (the empty
store) compiles the model, as a machine's first start with a configuration does; that start
and one with `--enforce-eager` show what compiling costs at start-up.

    python -m bench.startup --adapters 100000 --work build/bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from bench.systems import SystemConfig, ptmoe_store
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/startup.py", "bench/systems.py")

GIB = 1024**3
READY = re.compile(r"with (\d+) adapters .* ready in ([\d.]+) s")


def start_once(store: Path, model_dir: Path, log: Path, probe: str | None = None,
               extra: tuple[str, ...] = ()) -> dict:
    """One start over `store`; with `probe`, an adapter's name, then the time of /v1/models
    and of that adapter's first request (read from the store then)."""
    started = time.perf_counter()
    server = start_server(["--model", str(model_dir), "--adapters", str(store),
                           "--watch-interval", "0", "--no-fine-tune-worker", *extra], log,
                          env={"VLLM_CACHE_ROOT": str(log.parent / "vllm-cache")}, timeout=1800)
    healthy = time.perf_counter() - started
    api = psutil.Process(server.process.pid)
    engine_rss = sum(p.memory_info().rss for p in api.children(recursive=True))
    api_rss = api.memory_info().rss
    probed = probe_server(server.url, probe) if probe else {}
    stop_server(server)
    count, seconds = READY.search(log.read_text()).groups()
    return {"adapters": int(count), "ready_seconds": float(seconds),
            "launch_to_health_seconds": healthy,
            "api_process_rss_gib": api_rss / GIB, "engine_processes_rss_gib": engine_rss / GIB,
            **probed}


def probe_server(url: str, name: str) -> dict:
    def timed(call) -> tuple[float, httpx.Response]:
        started = time.perf_counter()
        response = call()
        response.raise_for_status()
        return 1000 * (time.perf_counter() - started), response

    with httpx.Client(base_url=url, timeout=300) as client:
        models_ms, models = timed(lambda: client.get("/v1/models"))
        body = {"model": name, "prompt": "Hello", "max_tokens": 1}
        cold_ms, _ = timed(lambda: client.post("/v1/completions", json=body))
        warm_ms, _ = timed(lambda: client.post("/v1/completions", json=body))
    return {"models_ms": models_ms, "models_bytes": len(models.content),
            "adapters_in_store_listed": models.json()["adapters_in_store"],
            "cold_request_ms": cold_ms, "warm_request_ms": warm_ms}


def linked_store(config: SystemConfig, count: int, distinct: int) -> Path:
    """`count` adapter folders `t40-<i>`, the first `distinct` written, the others hard links
    to their files (adapter i shares adapter i % distinct's)."""
    store = config.work_dir / f"ptmoe-{count}-of-{distinct}"
    sources = ptmoe_store(replace(config, work_dir=config.work_dir / f"distinct-{distinct}"),
                          distinct)[40]
    if (store / f"t40-{count - 1}").exists():
        return store
    store.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc="linking", mininterval=2):
        folder = store / f"t40-{i}"
        folder.mkdir(exist_ok=True)
        for file in sources[i % distinct].iterdir():
            if not (folder / file.name).exists():
                os.link(file, folder / file.name)
    return store


def hidden_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10000)
    parser.add_argument("--distinct", type=int, default=None,
                        help="write this many adapters and make the rest hard links to their "
                             "files (a store of 10^6 on a small disk; the start reads no "
                             "weights either way)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="starts of each, empty and full alternately")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the store is written, and kept for later runs (as "
                             "bench.residency lays it out); default a temporary folder")
    parser.add_argument("--dtype", default=None,
                        help="the server's --dtype (default: the server's own, the model's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    model_dir = args.model or ensure_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        started = time.perf_counter()
        config = SystemConfig(model_dir, DEFAULT_MODEL_NAME, work)
        if args.distinct:
            store = linked_store(config, args.adapters, args.distinct)
        else:
            store = ptmoe_store(config, args.adapters)[40][0].parent
        written = time.perf_counter() - started
        (Path(scratch) / "empty").mkdir()
        # The first start fills this run's compile cache: the price of compiling, beside an
        # eager start. Then alternately, the start time varies from start to start.
        dtype = ("--dtype", args.dtype) if args.dtype else ()
        compiling = start_once(Path(scratch) / "empty", model_dir, Path(scratch) / "first.log",
                               extra=dtype)
        eager = start_once(Path(scratch) / "empty", model_dir, Path(scratch) / "eager.log",
                           extra=(*dtype, "--enforce-eager"))
        empty, full = [], []
        for i in range(args.repeats):
            empty.append(start_once(Path(scratch) / "empty", model_dir,
                                    Path(scratch) / f"empty-{i}.log", extra=dtype))
            full.append(start_once(store, model_dir, Path(scratch) / f"full-{i}.log",
                                   probe=f"t40-{args.adapters - 1}", extra=dtype))
    report = {**provenance(),
              "hidden_size": hidden_size(model_dir), "first_start_compiling": compiling,
              "eager_start": eager, "without": empty, "with": full,
              "write_seconds": written}
    # The target: from launching the process to /health, full store against empty. The
    # "ready in" line times the project's own start-up alone (reading the store's index).
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    report["launch_to_health_ratio"] = (median(full, "launch_to_health_seconds")
                                        / median(empty, "launch_to_health_seconds"))
    report["index_seconds"] = median(full, "ready_seconds") - median(empty, "ready_seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
