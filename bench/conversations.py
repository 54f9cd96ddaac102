"""Multi-turn chat benchmark: how much of a conversation's later turns vLLM's prefix cache
serves, and what that does to throughput and time to first token.

Every system serves the same conversations: `--conversations` of `--turns` turns over one
generated system prompt of about `--system-tokens` tokens, each user turn a generated question,
each answer `--answer-tokens` tokens (greedy, `ignore_eos`, streamed through
/v1/chat/completions; the answer's text goes into the history, as chat clients send it). Turns
run in rounds: turn k of every conversation at once, then turn k+1, so that each round's
prefix-cache hit rate is read from the server's own counters (`vllm:prefix_cache_queries_total`
and `_hits_total`, in tokens; on this server's engine route the soft prompt's positions are
placeholder tokens of the prompt, so they are counted too). Conversation i uses adapter
i mod N.

The systems, each started alone and fresh (an empty prefix cache), with the same engine
settings (bench.systems: compiled, prefix caching on):
- `vllm`: vLLM's own server, the bare model;
- `vllm-lora`: vLLM's own server with N LoRA adapters of the size the other benchmarks match;
- `ptmoe-prompt`, `ptmoe-first_turn`: this server with N PT-MoE adapters (T=40, the paper's
  shape), routing each chat on its whole prompt or on turn 1's (`route_scope`, asked per
  request with `vllm_xargs.ptmoe_route_scope`); their `router_scaling` is `--router-scaling`
  (under "none" the soft prompt is keyed by the experts kept, so turn 1 of conversations that
  keep the same experts shares the system prompt's KV).

    python -m bench.conversations --adapters 1 64 --out bench/results/conversations.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from bench import systems
from bench.loadgen import percentile
from bench.provenance import provenance
from bench.residency import metric
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/conversations.py", "bench/systems.py", "bench/adapters.py")

SYSTEMS = ("vllm", "vllm-lora", "ptmoe-prompt", "ptmoe-first_turn")
TOPICS = ["check-in", "parking", "breakfast", "late checkout", "pets", "the spa", "airport "
          "transfers", "room service", "the pool", "cancellations", "invoices", "bicycles"]
WORDS = ("could you please tell me whether it would be possible to arrange something for "
         "tomorrow morning and what that would cost for two adults and a child").split()


def system_prompt(tokenizer, tokens: int) -> str:
    """A support bot's instructions, about `tokens` long: numbered house rules."""
    rules, number = [], 1
    while len(tokenizer.encode(" ".join(rules))) < tokens:
        topic = TOPICS[number % len(TOPICS)]
        rules.append(f"Rule {number}: when a guest asks about {topic}, answer politely, give "
                     f"the opening hours, mention the fee of {number * 3} euros, and offer "
                     f"to book it.")
        number += 1
    return "You are the front desk of the Seaside Hotel. " + " ".join(rules)


def questions(count: int, turns: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"About {rng.choice(TOPICS)}: " + " ".join(rng.sample(WORDS, 12)) + "?"
             for _ in range(turns)] for _ in range(count)]


async def ask(client: httpx.AsyncClient, model: str, messages: list[dict], answer_tokens: int,
              extra: dict) -> tuple[str, float, int]:
    """The answer's text, the seconds to its first token, and its token count."""
    started = time.perf_counter()
    first, text, tokens = None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": answer_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if first is None:
                    first = time.perf_counter() - started
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), first, tokens


async def converse(url: str, model_name, num_adapters: int, system: str,
                   asked: list[list[str]], answer_tokens: int, extra: dict) -> dict:
    histories = [[{"role": "system", "content": system}] for _ in asked]
    rounds = []
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for turn in range(len(asked[0])):
            for history, mine in zip(histories, asked):
                history.append({"role": "user", "content": mine[turn]})
            queries = metric(url, "vllm:prefix_cache_queries_total")
            hits = metric(url, "vllm:prefix_cache_hits_total")
            round_started = time.perf_counter()
            answers = await asyncio.gather(*(
                ask(client, model_name(i % num_adapters), history, answer_tokens, extra)
                for i, history in enumerate(histories)))
            rounds.append({
                "turn": turn + 1, "seconds": time.perf_counter() - round_started,
                "ttft": [first for _, first, _ in answers],
                "output_tokens": sum(tokens for _, _, tokens in answers),
                "prefix_cache_queries": metric(url, "vllm:prefix_cache_queries_total") - queries,
                "prefix_cache_hits": metric(url, "vllm:prefix_cache_hits_total") - hits})
            for history, (text, _, _) in zip(histories, answers):
                history.append({"role": "assistant", "content": text})
    return summarize(rounds, time.perf_counter() - started)


def summarize(rounds: list[dict], wall: float) -> dict:
    def hit_rate(chosen):
        queries = sum(r["prefix_cache_queries"] for r in chosen)
        return sum(r["prefix_cache_hits"] for r in chosen) / queries if queries else None

    later = rounds[1:]
    later_ttft = [t for r in later for t in r["ttft"]]
    return {
        "wall_seconds": wall,
        "output_tokens_per_second": sum(r["output_tokens"] for r in rounds) / wall,
        "ttft_turn_1_p50": percentile(rounds[0]["ttft"], 0.5),
        "ttft_turn_1_p99": percentile(rounds[0]["ttft"], 0.99),
        "ttft_later_turns_p50": percentile(later_ttft, 0.5),
        "ttft_later_turns_p99": percentile(later_ttft, 0.99),
        "hit_rate_turn_1": hit_rate(rounds[:1]), "hit_rate_later_turns": hit_rate(later),
        "rounds": rounds,
    }


@contextmanager
def started(system: str, config: systems.SystemConfig, num_adapters: int):
    """The system's endpoint and the request fields it takes."""
    if system == "vllm":
        with systems.vllm_bare(config) as endpoint:
            yield endpoint, {}
    elif system == "vllm-lora":
        with systems.vllm_lora(config, num_adapters) as endpoint:
            yield endpoint, {}
    else:
        scope = system.split("-", 1)[1]
        with systems.ptmoe(config, num_adapters) as endpoints:
            yield endpoints[max(endpoints)], {"vllm_xargs": {"ptmoe_route_scope": scope}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--router-scaling", choices=["probability", "none"],
                        default="probability", help="the PT-MoE adapters'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/results/conversations.json"))
    args = parser.parse_args()

    model_dir = ensure_default_model(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = system_prompt(tokenizer, args.system_tokens)
    asked = questions(args.conversations, args.turns)
    results = []
    began = time.time()
    with tempfile.TemporaryDirectory() as work:
        config = systems.SystemConfig(model_dir, DEFAULT_MODEL_NAME, Path(work), dtype=args.dtype,
                                      max_model_len=2048, router_scaling=args.router_scaling)
        for name in args.systems:
            for n in ([1] if name == "vllm" else args.adapters):
                with started(name, config, n) as (endpoint, extra):
                    summary = asyncio.run(converse(endpoint.url, endpoint.model_name, n, system,
                                                  asked, args.answer_tokens, extra))
                results.append({"system": name, "adapters": n, "system_info": endpoint.info,
                                **summary})
                print(f"{name} N={n}: {summary['output_tokens_per_second']:.1f} tok/s, hit rate "
                      f"turns>=2 {summary['hit_rate_later_turns']:.3f}, TTFT turns>=2 p50 "
                      f"{summary['ttft_later_turns_p50']:.3f} s", flush=True)
    report = {**provenance(), "model": DEFAULT_MODEL_NAME,
              "dtype": args.dtype, "router_scaling": args.router_scaling,
              "seconds": time.time() - began,
              "system_prompt_tokens": len(tokenizer.encode(system)),
              "conversations": args.conversations, "turns": args.turns,
              "answer_tokens": args.answer_tokens, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
