"""Start-up with many adapters in the store: the server's time to ready with none and with N
(the paper's shape at the model's H), from the log's "ready in" line.

    python -m bench.startup --adapters 10000
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from bench.adapters import write_ptmoe_adapters
from bench.server_process import start_server, stop_server
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

READY = re.compile(r"with (\d+) adapters .* ready in ([\d.]+) s")


def ready_seconds(store: Path, model_dir: Path, log: Path) -> tuple[int, float]:
    server = start_server(["--model", str(model_dir), "--adapters", str(store),
                           "--watch-interval", "0"], log)
    stop_server(server)
    count, seconds = READY.search(log.read_text()).groups()
    return int(count), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    model_dir = ensure_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.perf_counter()
        write_ptmoe_adapters(work / "store", model_dir, DEFAULT_MODEL_NAME, args.adapters,
                             prompt_length=40, num_experts=2, rank=36)
        written = time.perf_counter() - started
        (work / "empty").mkdir()
        _, empty = ready_seconds(work / "empty", model_dir, work / "empty.log")
        count, full = ready_seconds(work / "store", model_dir, work / "full.log")
    report = {"command": f"python -m bench.startup --adapters {args.adapters}",
              "adapters_loaded": count, "ready_seconds_without": empty,
              "ready_seconds_with": full, "load_seconds": full - empty,
              "adapters_per_second": count / (full - empty), "write_seconds": written}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
