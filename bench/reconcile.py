"""What following the store costs a server over many adapters: its start (reading the store's
index), the time of one look at the store (`sync_store`, the watcher's tick) while nothing
changed, and after each kind of change made through another server over the same store or by
hand (the replaced adapter is resident, so its new version is read at the look), beside what
looking at every folder would cost (a stat of each folder's two files, the floor of a scan per
tick).

Adapters are small (the tick's cost does not depend on their size, but for the one it loads).

    python -m bench.reconcile --adapters 10000 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from bench.provenance import provenance

from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.adapters.format import PtMoeAdapter, write_adapter
from ptmoe_serve.adapters.manager import AdapterManager
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore, folder_stamp

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/reconcile.py")

HIDDEN = 16
IDLE_LOOKS = 50
# A look within this long of a change to the store folder lists it again (store.py).
SETTLE_SECONDS = 2.5


def small_adapter(seed: int) -> PtMoeAdapter:
    config = AdapterConfig.v1("bench", hidden_size=HIDDEN, num_experts=2, prompt_length=4,
                              rank=2, top_k=1, router_scaling="probability")
    g = torch.Generator().manual_seed(seed)
    return PtMoeAdapter(config, torch.randn(2, 4, 2, generator=g),
                        torch.randn(2, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g),
                        torch.randn(2, generator=g))


def new_server(store: Path) -> AdapterManager:
    registry = AdapterRegistry(HIDDEN, 4096, torch.device("cpu"))
    manager = AdapterManager(registry, AdapterStore(store))
    manager.start()
    return manager


def timed_look(manager: AdapterManager) -> float:
    started = time.perf_counter()
    asyncio.run(manager.sync_store())
    return 1000 * (time.perf_counter() - started)


def measure(count: int, work: Path) -> dict:
    store = work / f"store{count}"
    library = work / f"library{count}"
    for i in tqdm(range(count), desc=f"writing {count} adapters"):
        write_adapter(small_adapter(i), store / f"a{i}")
    write_adapter(small_adapter(-1), library / "copied")
    started = time.perf_counter()
    follower = new_server(store)  # measured
    start_seconds = time.perf_counter() - started
    other = AdapterManager(AdapterRegistry(HIDDEN, 4096, torch.device("cpu")),
                           AdapterStore(store))  # makes the changes
    assert len(follower.catalog) == count
    # One resident, as a request leaves it: its replace through the other server is read and
    # placed at the look; the others' changes are the catalog's alone.
    asyncio.run(follower.resident.pin("a1"))
    config, weights = [(library / "copied" / f).read_bytes()
                       for f in ("adapter_config.json", "adapter_model.safetensors")]

    def after(change) -> float:
        change()
        return timed_look(follower)

    time.sleep(SETTLE_SECONDS)
    asyncio.run(follower.sync_store())
    idle = [timed_look(follower) for _ in range(IDLE_LOOKS)]
    changes = {
        "upload_new_name": after(lambda: asyncio.run(other.upload("fresh", config, weights))),
        "replace": after(lambda: asyncio.run(other.upload("a1", config, weights))),
        "unload": after(lambda: (asyncio.run(other.load_path("a2", str(store / "a2"), replace=True)),
                                 asyncio.run(other.unload("a2", purge=False)))),
        "purge": after(lambda: (asyncio.run(other.load_path("a3", str(store / "a3"), replace=True)),
                                asyncio.run(other.unload("a3", purge=True)))),
        "copied_in_by_hand": after(lambda: shutil.copytree(library / "copied", store / "hand")),
    }
    assert "fresh" in follower.catalog and "hand" in follower.catalog
    assert "a2" not in follower.catalog and "a3" not in follower.catalog
    assert follower.registry.get("a1").version > 1
    time.sleep(SETTLE_SECONDS)
    asyncio.run(follower.sync_store())
    settled = [timed_look(follower) for _ in range(IDLE_LOOKS)]
    started = time.perf_counter()
    scan = [folder_stamp(folder) for folder in follower.store.root.iterdir()
            if folder.is_dir() and not folder.name.startswith(".")]
    scan_ms = 1000 * (time.perf_counter() - started)
    return {"adapters": count, "folders_stamped": len(scan), "start_seconds": start_seconds,
            "idle_look_ms": {"p50": statistics.median(idle), "max": max(idle)},
            "idle_look_after_changes_ms": {"p50": statistics.median(settled),
                                           "max": max(settled)},
            "look_after_change_ms": changes, "stat_every_folder_ms": scan_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[10000])
    parser.add_argument("--out", type=Path, default=Path("bench/results/reconcile.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [measure(count, Path(work)) for count in args.adapters]
    report = {**provenance(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
