"""The routing step alone: soft prompts for a batch of heterogeneous requests, each naming a
random resident adapter, on this machine's device. The engine route's step (what vLLM's
worker runs: the batched torch version, and the fused Triton kernels on CUDA) against a
per-request loop over the plain reference; beside them the api route's step, which also
builds each request's [soft prompt; token embeddings] in the model's dtype.

    python -m bench.routing_step --hidden 576 4096 --resident 1 1000 --batch 1 8 64 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import astuple
from pathlib import Path

import torch
from bench.provenance import provenance

from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.adapters.format import PtMoeAdapter
from ptmoe_serve.engine.vllm_model import route_keys
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.routing.reference import route_reference
from ptmoe_serve.routing.api_route import ApiRoute
from ptmoe_serve.routing.route import RoutedRequest

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("ptmoe_serve/routing", "ptmoe_serve/adapters/bank.py", "bench/routing_step.py")

VOCAB = 49152


def random_adapter(hidden: int, t: int, n: int, r: int, g: torch.Generator,
                   device: torch.device) -> PtMoeAdapter:
    config = AdapterConfig.v1("bench", hidden_size=hidden, num_experts=n, prompt_length=t,
                              rank=r, top_k=1, router_scaling="probability")
    tensors = (torch.randn(n, t, r, generator=g) * 0.1, torch.randn(r, hidden, generator=g) * 0.1,
               torch.randn(n, hidden, generator=g), torch.zeros(n))
    return PtMoeAdapter(config, *(t.to(device) for t in tensors))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(hidden: int, resident: int, batch: int, prompt_tokens: int, device: torch.device,
            repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    registry = AdapterRegistry(hidden, 1 << 20, device)
    # Up to 64 distinct adapters, repeated to fill the bank: the bank's rows are what count.
    adapters = [random_adapter(hidden, 40, 2, 36, g, device) for _ in range(min(resident, 64))]
    entries = [registry.add(f"a{i}", adapters[i % len(adapters)], version=1) for i in range(resident)]
    bank = entries[0].bank
    table = torch.randn(VOCAB, hidden, generator=g).to(device)
    picks = torch.randint(0, resident, (batch,), generator=g).tolist()
    ids = [torch.randint(0, VOCAB, (prompt_tokens,), generator=g, device=device) for _ in picks]
    keys = [[*astuple(bank.shape), entries[p].slot] for p in picks]

    def engine_step(fused: bool):
        return lambda: route_keys({bank.shape: bank}, keys, ids, hidden, table.__getitem__,
                                  table if fused else None, torch.bfloat16)

    def loop():
        for p, i in zip(picks, ids):
            route_reference(entries[p].adapter, table[i]).soft_prompt.to(torch.bfloat16)

    route = ApiRoute(table, torch.bfloat16, device, fused=False)
    requests = [RoutedRequest(entries[p], i.tolist(), len(i)) for p, i in zip(picks, ids)]
    batched = median_seconds(engine_step(fused=False), repeats)
    looped = median_seconds(loop, repeats)
    # The kernels' timings mean something only compiled for a GPU, not interpreted.
    fused = median_seconds(engine_step(fused=True), repeats) if device.type == "cuda" else None
    api = median_seconds(lambda: route.compute(requests), repeats)
    return {"hidden": hidden, "resident": resident, "batch": batch, "prompt_tokens": prompt_tokens,
            "batched_ms": 1000 * batched, "fused_ms": 1000 * fused if fused else None,
            "loop_ms": 1000 * looped, "loop_over_batched": looped / batched,
            "api_step_ms": 1000 * api}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[576, 4096])
    parser.add_argument("--resident", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing_step.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for hidden in args.hidden:
        for resident in args.resident:
            for batch in args.batch:
                rows.append(measure(hidden, resident, batch, args.prompt_tokens, device,
                                    args.repeats))
                print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    report = {**provenance("python -m bench.routing_step " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k != "out")),
              "device": name, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
