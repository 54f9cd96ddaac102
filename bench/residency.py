"""The bounded resident set: cold first requests, and throughput when the banks hold a
fraction of the store, beside vLLM's multi-LoRA server doing the same job.

1. Fractions: a store of `--adapters` adapters of the paper's shape (N=2, T=40, R=36), served
   by one server per `--fractions` entry with `--max-resident-adapters` that fraction of the
   store, all up at once, under the same Zipf traffic in alternating rounds. The server holding
   the whole store has the workload's adapters made resident beforehand; the others start
   cold and evict as they go.
2. Peers: `--peer-adapters` adapters and a cap of `--peer-fraction` of them on this server and
   on two of vLLM's own servers with as many LoRA adapters, `--max-loras` the cap, the
   filesystem resolver loading an adapter the first time a request names it: LoRA of the
   matched size (rank 1 on `q_proj`, about a PT-MoE adapter's parameter count) and of the
   common production shape (rank 8 on the attention projections, 27 times as many
   parameters), each named as what it is. The same Zipf traffic, alternating; then, on each,
   the time to first token of requests one at a time: an adapter's first request (read from
   disk), the same adapter again (warm), and adapters evicted since, from the host tier
   (`--max-cpu-adapters`, vLLM's `--max-cpu-loras`).

    python -m bench.residency --adapters 10000 --fractions 0.01 0.1 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.adapters import lora_parameters, write_lora_adapters
from bench.loadgen import percentile, run_workload
from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from bench.systems import SystemConfig, _engine_args, _vllm_args, ptmoe_store, vllm_command
from bench.workload import CORPUS, WorkloadSpec, make_workload
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/residency.py", "bench/systems.py", "bench/loadgen.py",
            "bench/workload.py", "bench/adapters.py")

PROMPT = "Tell me a short story about a robot who learns to paint."
# Cold-start measurement: adapters read one at a time (the traffic never asked them).
COLD_ADAPTERS = 64
# The LoRA peers: the matched size for comparing compute, and the shape LoRA is commonly
# trained in, whose files (and loads) are larger.
LORA_PEERS = {"vllm-lora-matched": (1, ("q_proj",)),
              "vllm-lora-production": (8, ("q_proj", "k_proj", "v_proj", "o_proj"))}


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


RESIDENCY_SERIES = {"loads_disk": ("ptmoe_adapter_loads_total", {"source": "disk"}),
                    "loads_host": ("ptmoe_adapter_loads_total", {"source": "host"}),
                    "evictions": ("ptmoe_adapter_evictions_total", {})}


def residency_counts(url: str) -> dict[str, float]:
    return {key: metric(url, name, **labels) for key, (name, labels) in RESIDENCY_SERIES.items()}


@contextmanager
def ptmoe_server(config: SystemConfig, store: Path, cap: int, host: int, log: Path,
                 admin_key_file: Path):
    server = start_server(["--model", str(config.model_dir), "--adapters", str(store),
                           "--kv-cache-gib", str(config.kv_cache_gib), "--watch-interval", "0",
                           "--max-resident-adapters", str(cap), "--max-cpu-adapters", str(host),
                           "--admin-api-key-file", str(admin_key_file), "--no-fine-tune-worker",
                           *_engine_args(config)], log, env=config.engine_env(), timeout=1800)
    try:
        yield server.url
    finally:
        stop_server(server)


@contextmanager
def lora_server(config: SystemConfig, folder: Path, cap: int, host: int, log: Path):
    resolver = {"VLLM_PLUGINS": "lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(folder),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    server = start_server([*_vllm_args(config), "--enable-lora", "--max-lora-rank",
                           str(config.lora_rank), "--max-loras", str(cap),
                           "--max-cpu-loras", str(max(host, cap))], log,
                          command=vllm_command(), env={**config.engine_env(), **resolver},
                          timeout=1800)
    try:
        yield server.url
    finally:
        stop_server(server)


async def first_token_seconds(client: httpx.AsyncClient, model: str) -> float:
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": 2, "stream": True,
            "ignore_eos": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code} "
                               f"{(await response.aread())[:300]!r}")
        first = None
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    return first


def summary_ms(values: list[float]) -> dict:
    ms = [1000 * v for v in values]
    return {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99),
            "mean": statistics.fmean(ms), "n": len(ms)}


async def cold_starts(url: str, names: list[str], others: list[str]) -> dict:
    """One at a time: each adapter's first request and the same again; then, once `others`
    (as many as the cap, one request each) have evicted them all, each brought back from the
    host tier."""
    disk, warm, host = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await first_token_seconds(client, names[-1])  # the server's first request, aside
        for name in names[:-1]:
            disk.append(await first_token_seconds(client, name))
            warm.append(await first_token_seconds(client, name))
        for name in others:
            await first_token_seconds(client, name)
        for name in names[:-1]:
            host.append(await first_token_seconds(client, name))
    return {"disk": summary_ms(disk), "warm": summary_ms(warm), "host": summary_ms(host),
            "disk_minus_warm_p50_ms": summary_ms(disk)["p50"] - summary_ms(warm)["p50"],
            "host_minus_warm_p50_ms": summary_ms(host)["p50"] - summary_ms(warm)["p50"],
            "each_ms": {"disk": [1000 * v for v in disk], "warm": [1000 * v for v in warm],
                        "host": [1000 * v for v in host]}}


def pin_all(url: str, admin_key: str, names: list[str]) -> None:
    """Make `names` resident beforehand (pinned, then unpinned: resident, evictable)."""
    headers = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=url, timeout=300, headers=headers) as client:
        for name in names:
            client.post(f"/v1/adapters/{name}/pin").raise_for_status()
            client.delete(f"/v1/adapters/{name}/pin").raise_for_status()


def round_workloads(spec: WorkloadSpec, config: SystemConfig, rounds: int) -> list[list]:
    """A Zipf stream cut into rounds: each round's requests drawn afresh (its own seed), so a
    capped server keeps loading and evicting from round to round."""
    ids = corpus(config)
    return [make_workload(replace(spec, seed=spec.seed + i), ids) for i in range(rounds)]


def traffic_rounds(systems: dict[str, tuple[str, list[str]]], workloads: list[list],
                   spec: WorkloadSpec, measure_residency: bool) -> dict[str, list[dict]]:
    """Each round's requests to every system, in an order that rotates each round."""
    results: dict[str, list[dict]] = {name: [] for name in systems}
    order = list(systems)
    for index, requests in enumerate(workloads):
        for name in order[index % len(order):] + order[:index % len(order)]:
            url, names = systems[name]
            before = residency_counts(url) if measure_residency else {}
            summary = asyncio.run(run_workload(url, requests, spec, lambda i: names[i],
                                               progress=f"{name} round {index + 1}"))
            if measure_residency:
                after = residency_counts(url)
                summary["residency"] = {k: after[k] - before[k] for k in after}
                summary["evictions_per_second"] = (summary["residency"]["evictions"]
                                                   / summary["wall_seconds"])
            summary["round"] = index + 1
            results[name].append(summary)
            print(name, index + 1, f"{summary['output_tokens_per_second']:.1f} tok/s",
                  summary.get("residency", ""), file=sys.stderr)
    return results


def medians(results: dict[str, list[dict]]) -> dict[str, float]:
    return {name: statistics.median(r["output_tokens_per_second"] for r in rounds)
            for name, rounds in results.items()}


def fractions_part(config: SystemConfig, args, admin_key: str, key_file: Path) -> dict:
    folders = ptmoe_store(config, args.adapters)[40]
    names = [f.name for f in folders]
    spec = WorkloadSpec(args.adapters, args.requests, popularity="zipf", zipf_exponent=1.0,
                        concurrency=args.concurrency, output_tokens=args.output_tokens,
                        prompt_tokens=args.prompt_tokens)
    workloads = round_workloads(spec, config, args.rounds)
    asked = sorted({names[r.adapter_index] for requests in workloads for r in requests})
    caps = {f"{fraction:g}": max(1, round(fraction * args.adapters)) for fraction in
            args.fractions}
    with ExitStack() as stack:
        urls = {label: stack.enter_context(ptmoe_server(
                    config, folders[0].parent, cap, cap, config.work_dir / f"cap-{cap}.log",
                    key_file)) for label, cap in caps.items()}
        for label, cap in caps.items():
            if cap >= args.adapters:  # the server holding the whole store: all resident
                pin_all(urls[label], admin_key, asked)
        results = traffic_rounds({label: (url, names) for label, url in urls.items()},
                                 workloads, spec, measure_residency=True)
    full = medians(results)
    top = f"{max(args.fractions):g}"
    return {"adapters": args.adapters, "caps": caps, "workload": spec.__dict__,
            "distinct_adapters_asked": len(asked),
            "rounds": results, "median_output_tokens_per_second": full,
            "ratio_to_all_resident": {label: full[label] / full[top] for label in full}}


def peers_part(config: SystemConfig, args, key_file: Path) -> dict:
    count, cap = args.peer_adapters, max(1, round(args.peer_fraction * args.peer_adapters))
    folders = ptmoe_store(config, count)[40]
    loras = {}
    for label, (rank, targets) in LORA_PEERS.items():
        loras[label] = write_lora_adapters(config.work_dir / f"lora-{count}-{label}",
                                           config.model_dir, count, rank, list(targets))
    spec = WorkloadSpec(count, args.requests, popularity="zipf", zipf_exponent=1.0,
                        concurrency=args.concurrency, output_tokens=args.output_tokens,
                        prompt_tokens=args.prompt_tokens, seed=1)
    workloads = round_workloads(spec, config, args.rounds)
    # The cold measurement's adapters: ones the traffic never asked for.
    asked = {r.adapter_index for requests in workloads for r in requests}
    cold = [i for i in range(count) if i not in asked][-COLD_ADAPTERS:]
    # Adapters that push the cold ones out of the banks (into the host tier) afterwards.
    others = [i for i in range(count) if i not in cold][:cap]
    with ExitStack() as stack:
        systems = {"ptmoe": (stack.enter_context(ptmoe_server(
            config, folders[0].parent, cap, count, config.work_dir / "peer-ptmoe.log",
            key_file)), [f.name for f in folders])}
        for label, (rank, targets) in LORA_PEERS.items():
            url = stack.enter_context(lora_server(
                replace(config, lora_rank=rank, lora_targets=targets),
                loras[label][0].parent, cap, count, config.work_dir / f"peer-{label}.log"))
            systems[label] = (url, [f.name for f in loras[label]])
        results = traffic_rounds(systems, workloads, spec, measure_residency=False)
        cold_results = {}
        for name, (url, names) in systems.items():
            before = residency_counts(url) if name == "ptmoe" else {}
            cold_results[name] = asyncio.run(cold_starts(url, [names[i] for i in cold],
                                                         [names[i] for i in others]))
            if name == "ptmoe":
                after = residency_counts(url)
                cold_results[name]["residency"] = {k: after[k] - before[k] for k in after}
    throughput = medians(results)
    return {"adapters": count, "cap": cap, "workload": spec.__dict__,
            "lora": {label: {"rank": rank, "targets": list(targets),
                             "parameters": lora_parameters(loras[label][0]),
                             "bytes": (loras[label][0] / "adapter_model.safetensors"
                                       ).stat().st_size}
                     for label, (rank, targets) in LORA_PEERS.items()},
            "ptmoe_bytes": (folders[0] / "adapter_model.safetensors").stat().st_size,
            "rounds": results, "median_output_tokens_per_second": throughput,
            "ptmoe_over": {label: throughput["ptmoe"] / throughput[label]
                           for label in LORA_PEERS},
            "cold_start": cold_results}


def plot_fractions(part: dict, out: Path) -> None:
    """Throughput (median of rounds, and each round) against the resident fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(part["rounds"], key=float)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [100 * float(label) for label in labels]
    ax.plot(xs, [part["median_output_tokens_per_second"][label] for label in labels], "o-",
            label="median of rounds")
    for label, x in zip(labels, xs):
        ax.scatter([x] * len(part["rounds"][label]),
                   [r["output_tokens_per_second"] for r in part["rounds"][label]],
                   color="grey", s=12, zorder=3)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"resident fraction of {part['adapters']:,} adapters (--max-resident-adapters)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Zipf (s=1) traffic, cold adapters loaded on first use", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def corpus(config: SystemConfig) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model_dir).encode(CORPUS * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--peer-adapters", type=int, default=1000)
    parser.add_argument("--peer-fraction", type=float, default=0.1)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--parts", nargs="+", choices=["fractions", "peers"],
                        default=["fractions", "peers"])
    parser.add_argument("--work", type=Path, default=None,
                        help="where stores are written (and kept); default a temporary folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/residency.json"))
    args = parser.parse_args()
    model_dir = ensure_default_model(default_cache_dir())
    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        config = SystemConfig(model_dir, DEFAULT_MODEL_NAME, work, dtype=args.dtype,
                              kv_cache_gib=1.0)
        admin_key = secrets.token_urlsafe(16)
        key_file = work / "admin.key"
        key_file.write_text(admin_key)
        report = provenance()
        if "fractions" in args.parts:
            report["fractions"] = fractions_part(config, args, admin_key, key_file)
        if "peers" in args.parts:
            report["peers"] = peers_part(config, args, key_file)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "fractions" in report:
        plot_fractions(report["fractions"], args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()
