"""Memory with many adapters in the store: the API process's resident memory once ready, with
none and with N adapters in the store (hard links, as bench.startup lays them out), per
adapter; the fine-tuning worker's, idle over the same two stores; and the worker's growth while
other servers append journal lines it reads with each write of its own (a checkpoint adapter),
with the bound on lines no one takes and without it.

    python -m bench.memory --adapters 1000000 --distinct 1000 --work build/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.provenance import provenance
from bench.startup import linked_store, start_once
from bench.systems import SystemConfig
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "trainer", "bench/memory.py", "bench/startup.py")

MIB = 1024**2
# How long an idle worker is given after it says it runs (its look for orphans included).
WORKER_SETTLE_SECONDS = 20
# The worker's store under a stream of other servers' journal lines: it reads them with each
# write of its own.
JOURNAL_GROWTH = """
import json, sys, psutil
from pathlib import Path
from ptmoe_serve.adapters import journal
from ptmoe_serve.adapters.store import AdapterStore

root, lines, batch, bound = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if bound == "off":
    journal.MAX_UNTAKEN_LINES = 10**12
worker, others = AdapterStore(root), AdapterStore(root)
process, rss = psutil.Process(), []
for done in range(0, lines, batch):
    others.journal.append([{"name": f"n{(done + i) % 1000}", "unloaded": True}
                           for i in range(batch)])
    worker.record_unloaded("worker-checkpoint")
    rss.append([done + batch, process.memory_info().rss])
print(json.dumps(rss))
"""


def worker_rss(store: Path, model_dir: Path, log: Path) -> float:
    """The idle fine-tuning worker's resident memory over `store`, in MiB."""
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "ptmoe_serve.cli", "fine-tune-worker",
                                   "--adapters", str(store), "--model", str(model_dir)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "fine-tuning worker over" not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(WORKER_SETTLE_SECONDS)
        return psutil.Process(worker.pid).memory_info().rss / MIB
    finally:
        worker.terminate()
        worker.wait()


def journal_growth(root: Path, lines: int, batch: int, bound: str) -> list[list[int]]:
    """[lines appended, the worker's RSS in bytes] after each batch."""
    root.mkdir(parents=True)
    told = subprocess.run([sys.executable, "-c", JOURNAL_GROWTH, str(root), str(lines),
                           str(batch), bound], capture_output=True, text=True, check=True)
    return json.loads(told.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100000)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--journal-lines", type=int, default=100000)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the store is written, and kept for later runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    args = parser.parse_args()
    model_dir = ensure_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        work = args.work or scratch
        store = linked_store(SystemConfig(model_dir, DEFAULT_MODEL_NAME, work), args.adapters,
                             args.distinct)
        (scratch / "empty").mkdir()
        # The machine's first start fills vLLM's compile cache: aside.
        start_once(scratch / "empty", model_dir, scratch / "warm-up.log")
        api_empty = start_once(scratch / "empty", model_dir, scratch / "empty.log")
        api_full = start_once(store, model_dir, scratch / "full.log")
        worker_empty = worker_rss(scratch / "empty", model_dir, scratch / "worker-empty.log")
        worker_full = worker_rss(store, model_dir, scratch / "worker-full.log")
        batch = args.journal_lines // 10
        growth = {bound: journal_growth(scratch / f"journal-{bound}", args.journal_lines, batch,
                                        bound) for bound in ("on", "off")}
    api_bytes = (api_full["api_process_rss_gib"] - api_empty["api_process_rss_gib"]) * 1024**3
    report = {
        **provenance(),
        "adapters": args.adapters,
        "api_process_mib": {"empty": api_empty["api_process_rss_gib"] * 1024,
                            "full": api_full["api_process_rss_gib"] * 1024},
        "api_bytes_per_adapter": api_bytes / args.adapters,
        "worker_mib": {"empty": worker_empty, "full": worker_full},
        "worker_journal_growth_mib": {
            bound: [[lines, rss / MIB] for lines, rss in rows] for bound, rows in growth.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
