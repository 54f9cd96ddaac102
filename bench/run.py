"""Throughput and latency of all systems in one run, on the same machine, model and workload.

    python -m bench.run --preset quick   # `make bench`: 64 adapters of T=16 and T=40, short
                                         # prompts, 48 new tokens, 32 concurrent, 3 rounds
    python -m bench.run --preset full    # `make bench-full`: 1 to 4096 adapters, uniform and
                                         # Zipf, closed loop and Poisson arrivals

All servers are up at once and every round runs each system once, in an order that rotates
from round to round: drift on a shared machine then reaches every system alike. Each round is
reported, and the ratios are taken between medians over the rounds. Writes the results as
JSON (with the command, machine and versions) and plots them."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer

from bench import systems
from bench.loadgen import run_workload
from bench.plot import plot_results
from bench.provenance import provenance
from bench.workload import CORPUS, WorkloadSpec, instruction_ids, make_workload
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/run.py", "bench/systems.py", "bench/loadgen.py", "bench/workload.py",
            "bench/adapters.py")


@dataclass(frozen=True)
class Preset:
    adapter_counts: tuple[int, ...]
    popularities: tuple[str, ...]
    arrivals: tuple[str, ...]
    num_requests: int
    concurrency: int
    rate: float
    prompt_tokens: int
    output_tokens: int
    prompt_lengths: tuple[int, ...]  # T of the adapters
    rounds: int
    transformers_at: tuple[int, ...]  # adapter counts at which the transformers loop runs


PRESETS = {
    # Decode-heavy, as one adapter per tenant serves chat: most of the time goes to new tokens.
    "quick": Preset((64,), ("uniform",), ("closed",), 96, 32, 4.0, 16, 48, (16, 40), 3, (64,)),
    "full": Preset((1, 16, 256, 4096), ("uniform", "zipf"), ("closed", "poisson"), 128, 16, 1.0,
                   64, 32, (40,), 3, (16,)),
}


@dataclass(frozen=True)
class Arm:
    """One measured system: its name, the T it stands for (None where no soft prompt is
    involved), and where its requests go."""
    system: str
    prompt_length: int | None
    endpoint: systems.Endpoint


def start_arms(stack: ExitStack, config: systems.SystemConfig, num_adapters: int,
               chosen: set[str], instruction: list[int]) -> list[Arm]:
    arms = []
    for system, location in (("ptmoe", "engine"), ("ptmoe-api", "api")):
        if system in chosen:
            by_length = stack.enter_context(systems.ptmoe(config, num_adapters, location))
            arms += [Arm(system, t, endpoint) for t, endpoint in by_length.items()]
    if chosen & {"vllm", "vllm-instruction"}:
        bare = stack.enter_context(systems.vllm_bare(config))
        if "vllm" in chosen:
            arms += [Arm("vllm", t, systems.padded(bare, t)) for t in config.prompt_lengths]
        if "vllm-instruction" in chosen:
            arms.append(Arm("vllm-instruction", None, systems.instructed(bare, instruction)))
    if "vllm-lora" in chosen:
        arms.append(Arm("vllm-lora", None,
                        stack.enter_context(systems.vllm_lora(config, num_adapters))))
    return arms


def rotated(arms: list[Arm], round_index: int) -> list[Arm]:
    shift = round_index % len(arms) if arms else 0
    return arms[shift:] + arms[:shift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (preset's)")
    parser.add_argument("--output-tokens", type=int, help="new tokens per request (preset's)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+",
                        help="soft prompt lengths T (preset's)")
    parser.add_argument("--systems", default=",".join(systems.SYSTEMS),
                        help="comma-separated subset to run")
    parser.add_argument("--adapters", type=int, nargs="+", help="adapter counts (preset's)")
    parser.add_argument("--popularity", nargs="+", choices=["uniform", "zipf"])
    parser.add_argument("--arrival", nargs="+", choices=["closed", "poisson"])
    parser.add_argument("--requests", type=int, help="requests per workload (preset's)")
    parser.add_argument("--concurrency", type=int, help="closed-loop clients (preset's)")
    parser.add_argument("--rounds", type=int, help="rounds over all systems (preset's)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every vLLM-based system eagerly (vLLM's default compiles)")
    parser.add_argument("--ptmoe-args", default="",
                        help="more options for this server only (the peers keep theirs), "
                             "e.g. --ptmoe-args=--enforce-eager")
    parser.add_argument("--out", type=Path, default=Path("bench/results/run.json"))
    args = parser.parse_args()
    preset = replace(PRESETS[args.preset], **{
        field: value for field, value in (
            ("adapter_counts", tuple(args.adapters or ())),
            ("popularities", tuple(args.popularity or ())),
            ("arrivals", tuple(args.arrival or ())),
            ("prompt_lengths", tuple(args.prompt_lengths or ())),
            ("num_requests", args.requests), ("concurrency", args.concurrency),
            ("prompt_tokens", args.prompt_tokens), ("output_tokens", args.output_tokens),
            ("rounds", args.rounds)) if value})
    chosen = set(args.systems.split(","))

    model_dir = ensure_default_model(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus_ids = tokenizer.encode(CORPUS * 4)
    instruction = instruction_ids(tokenizer)
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        config = systems.SystemConfig(model_dir, DEFAULT_MODEL_NAME, Path(work), dtype=args.dtype,
                                      prompt_lengths=preset.prompt_lengths,
                                      enforce_eager=args.enforce_eager,
                                      ptmoe_args=tuple(args.ptmoe_args.split()))

        def specs(num_adapters: int):
            for popularity in preset.popularities:
                for arrival in preset.arrivals:
                    yield WorkloadSpec(num_adapters, preset.num_requests, preset.prompt_tokens,
                                       preset.output_tokens, popularity, arrival=arrival,
                                       concurrency=preset.concurrency, rate=preset.rate)

        def measure(arm: Arm, spec: WorkloadSpec, round_index: int) -> None:
            endpoint = arm.endpoint
            requests = make_workload(spec, corpus_ids)
            label = (f"round {round_index + 1} {arm.system}"
                     f"{f' T={arm.prompt_length}' if arm.prompt_length else ''} "
                     f"N={spec.num_adapters} {spec.popularity} {spec.arrival}")
            cpu_before = endpoint.cpu_seconds()
            summary = asyncio.run(run_workload(endpoint.url, requests, spec, endpoint.model_name,
                                               endpoint.prompt_ids, progress=label))
            summary["cpu_seconds"] = {k: v - cpu_before[k]
                                      for k, v in endpoint.cpu_seconds().items()}
            results.append({"system": arm.system, "prompt_length": arm.prompt_length,
                            "round": round_index + 1, "workload": asdict(spec),
                            "system_info": endpoint.info, **summary})
            print(f"{label}: {summary['output_tokens_per_second']:.1f} tok/s, TPOT p50 "
                  f"{1000 * (summary['tpot_p50'] or 0):.1f} ms, {summary['errors']} errors",
                  flush=True)

        for n in preset.adapter_counts:
            with ExitStack() as stack:
                arms = start_arms(stack, config, n, chosen, instruction)
                for round_index in range(preset.rounds):
                    for spec in specs(n):
                        for arm in rotated(arms, round_index):
                            measure(arm, spec, round_index)
            if "transformers" in chosen and n in preset.transformers_at:
                spec = replace(next(specs(n)), arrival="closed")
                summary = systems.transformers_loop(config, make_workload(spec, corpus_ids), n,
                                                    batch_size=spec.concurrency)
                results.append({"system": "transformers",
                                "prompt_length": max(preset.prompt_lengths), "round": 1,
                                "workload": asdict(spec),
                                "system_info": {"batch_size": spec.concurrency}, **summary})
                print(f"transformers N={n}: {summary['output_tokens_per_second']:.1f} tok/s",
                      flush=True)

    report = {
        **provenance(command(args)), "model": DEFAULT_MODEL_NAME,
        "dtype": args.dtype, "seconds": time.time() - started, "preset": asdict(preset),
        "config": {k: str(v) for k, v in asdict(config).items() if k != "work_dir"},
        "instruction_tokens": len(instruction),
        "results": results, "medians": medians(results), "ratios": ratios(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_results(report, args.out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=2))


def command(args: argparse.Namespace) -> str:
    """The command line that repeats this run (its output file aside)."""
    words = ["python -m bench.run"]
    for name, value in vars(args).items():
        if value in (None, False, "") or name == "out":
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words.append(f"{flag} {' '.join(map(str, value))}")
        else:
            words.append(f"{flag}={value}" if str(value).startswith("-") else f"{flag} {value}")
    return " ".join(words)


def _workload_key(result: dict) -> tuple:
    w = result["workload"]
    return (w["num_adapters"], w["popularity"], w["arrival"])


def medians(results: list[dict]) -> list[dict]:
    """Per system, T and workload: the median over rounds of throughput and of the rounds'
    time-per-output-token and time-to-first-token medians."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["system"], r.get("prompt_length"), _workload_key(r)), []).append(r)

    def median_of(rows: list[dict], field: str) -> float | None:
        values = [row[field] for row in rows if row.get(field) is not None]
        return statistics.median(values) if values else None

    return [{"system": system, "prompt_length": length, "num_adapters": key[0],
             "popularity": key[1], "arrival": key[2], "rounds": len(rows),
             **{field: median_of(rows, field) for field in
                ("output_tokens_per_second", "tpot_p50", "ttft_p50", "latency_p50")}}
            for (system, length, key), rows in groups.items()]


def ratios(results: list[dict]) -> list[dict]:
    """ptmoe's median throughput over each peer's, and its median time per output token over
    the peer's, workload by workload: against the bare model and the api route at the same T,
    against the instruction, LoRA and transformers at the longest T."""
    table = {(m["system"], m["prompt_length"], (m["num_adapters"], m["popularity"],
                                                 m["arrival"])): m for m in medians(results)}
    longest = max((m[1] for m in table if m[0] == "ptmoe" and m[1] is not None), default=None)
    rows = []
    for (system, length, workload), ours in sorted(table.items(), key=str):
        if system != "ptmoe":
            continue
        row = {"num_adapters": workload[0], "popularity": workload[1], "arrival": workload[2],
               "prompt_length": length, "ptmoe_tok_s": ours["output_tokens_per_second"]}
        peers = [("ptmoe-api", length), ("vllm", length)]
        if length == longest:
            peers += [("vllm-instruction", None), ("vllm-lora", None), ("transformers", length)]
        for peer, peer_length in peers:
            theirs = table.get((peer, peer_length, workload))
            if not theirs:
                continue
            row[f"vs_{peer}"] = (ours["output_tokens_per_second"]
                                 / theirs["output_tokens_per_second"])
            if ours["tpot_p50"] and theirs["tpot_p50"]:
                row[f"tpot_vs_{peer}"] = ours["tpot_p50"] / theirs["tpot_p50"]
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
