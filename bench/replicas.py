"""Two servers over one adapter store, as replicas behind a load balancer run: every change is
made through the first, and the benchmark times how long the second takes to answer as the
first does (a greedy completion, polled every 50 ms), for each kind of change: an upload of a
new name, a replace, an unload, a load again from the store's folder, a purge. `--cycles`
repeats the five.

    python -m bench.replicas --cycles 10 --watch-interval 0.5
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.adapters import write_ptmoe_adapters
from bench.loadgen import percentile
from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/replicas.py", "bench/adapters.py")

PROMPT = "Once upon a time, there was a little"
POLL_SECONDS = 0.05
GIVE_UP_SECONDS = 60


def greedy(client: httpx.Client, model: str) -> str | None:
    """The greedy completion, or None where the server does not serve `model`."""
    response = client.post("/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    return response.json()["choices"][0]["text"] if response.status_code == 200 else None


def seconds_until_equal(first: httpx.Client, second: httpx.Client, model: str) -> float:
    """From now until the second answers `model` as the first does."""
    expected = greedy(first, model)
    started = time.monotonic()
    while time.monotonic() - started < GIVE_UP_SECONDS:
        if greedy(second, model) == expected:
            return time.monotonic() - started
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"the second server did not follow a change to {model} "
                       f"in {GIVE_UP_SECONDS} s")


def cycle(first: httpx.Client, second: httpx.Client, store: Path, name: str,
          versions: tuple[Path, Path]) -> dict[str, float]:
    """Each kind of change through the first, timed until the second follows."""
    def upload(folder: Path) -> None:
        files = {f: (f, (folder / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        first.put(f"/v1/adapters/{name}", files=files).raise_for_status()

    changes = {"upload": lambda: upload(versions[0]),
               "replace": lambda: upload(versions[1]),
               "unload": lambda: first.delete(f"/v1/adapters/{name}").raise_for_status(),
               "load": lambda: first.post("/v1/adapters", json={
                   "name": name, "path": str(store / name)}).raise_for_status(),
               "purge": lambda: first.delete(f"/v1/adapters/{name}",
                                             params={"purge": "true"}).raise_for_status()}
    timed = {}
    for kind, change in changes.items():
        change()
        timed[kind] = seconds_until_equal(first, second, name)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--watch-interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/replicas.json"))
    args = parser.parse_args()
    model_dir = ensure_default_model(default_cache_dir())
    report = provenance()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "store").mkdir()
        library = write_ptmoe_adapters(root / "library", model_dir, DEFAULT_MODEL_NAME, 2,
                                       prompt_length=40, num_experts=2, rank=36)
        admin_key = secrets.token_urlsafe(16)
        (root / "admin.key").write_text(admin_key)
        server_args = ["--model", str(model_dir), "--dtype", "float32",
                       "--max-model-len", "512", "--adapters", str(root / "store"),
                       "--admin-api-key-file", str(root / "admin.key"),
                       "--watch-interval", str(args.watch_interval), "--enforce-eager",
                       "--no-fine-tune-worker"]
        with ThreadPoolExecutor(2) as pool:
            servers = list(pool.map(lambda i: start_server(server_args, root / f"{i}.log"),
                                    (0, 1)))
        try:
            headers = {"authorization": f"Bearer {admin_key}"}
            with httpx.Client(base_url=servers[0].url, timeout=120, headers=headers) as first, \
                    httpx.Client(base_url=servers[1].url, timeout=120) as second:
                cycles = [cycle(first, second, root / "store", f"tenant{i}", tuple(library))
                          for i in range(args.cycles)]
        finally:
            for server in servers:
                stop_server(server)
    every = [seconds for timed in cycles for seconds in timed.values()]
    report.update({
        "watch_interval_seconds": args.watch_interval, "poll_seconds": POLL_SECONDS,
        "cycles": cycles,
        "by_change": {kind: {"p50": statistics.median(c[kind] for c in cycles),
                             "max": max(c[kind] for c in cycles)} for kind in cycles[0]},
        "all": {"p50": statistics.median(every), "p99": percentile(every, 0.99),
                "max": max(every), "n": len(every)}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["by_change"], indent=2), json.dumps(report["all"]))


if __name__ == "__main__":
    main()
