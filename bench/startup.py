"""Start-up with many adapters in the store: the server's time to ready with none and with N
(the paper's shape at the model's H), from the log's "ready in" line, and the memory of the
server's processes once ready (the API process; the engine's, which hold the banks).

    python -m bench.startup --adapters 100000
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.adapters import write_ptmoe_adapters
from bench.server_process import start_server, stop_server
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

GIB = 1024**3
READY = re.compile(r"with (\d+) adapters .* ready in ([\d.]+) s")


def start_once(store: Path, model_dir: Path, log: Path) -> dict:
    server = start_server(["--model", str(model_dir), "--adapters", str(store),
                           "--watch-interval", "0"], log, timeout=1800)
    api = psutil.Process(server.process.pid)
    engine_rss = sum(p.memory_info().rss for p in api.children(recursive=True))
    api_rss = api.memory_info().rss
    stop_server(server)
    count, seconds = READY.search(log.read_text()).groups()
    return {"adapters": int(count), "ready_seconds": float(seconds),
            "api_process_rss_gib": api_rss / GIB, "engine_processes_rss_gib": engine_rss / GIB}


def hidden_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10000)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    model_dir = args.model or ensure_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.perf_counter()
        write_ptmoe_adapters(work / "store", model_dir, DEFAULT_MODEL_NAME, args.adapters,
                             prompt_length=40, num_experts=2, rank=36)
        written = time.perf_counter() - started
        (work / "empty").mkdir()
        empty = start_once(work / "empty", model_dir, work / "empty.log")
        full = start_once(work / "store", model_dir, work / "full.log")
    load = full["ready_seconds"] - empty["ready_seconds"]
    report = {"command": " ".join(["python -m bench.startup", *sys.argv[1:]]),
              "hidden_size": hidden_size(model_dir), "without": empty, "with": full,
              "load_seconds": load, "adapters_per_second": full["adapters"] / load,
              "write_seconds": written}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
