"""The load generator: sends a workload to an OpenAI-compatible server over loopback,
streaming, and records each request's time to first token, latency and output tokens.

Bounded in count (the workload) and in time (`deadline`): requests not started by the deadline
are counted as not sent, never retried."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import httpx
from tqdm import tqdm

from bench.workload import BenchRequest, WorkloadSpec


@dataclass
class RequestRecord:
    adapter_index: int
    ok: bool
    ttft: float | None = None  # seconds from send to first token
    latency: float | None = None  # seconds from send to last token
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(records: list[RequestRecord], wall_seconds: float) -> dict:
    done = [r for r in records if r.ok]
    ttft = [r.ttft for r in done if r.ttft is not None]
    # time per output token after the first one
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1)
            for r in done if r.ttft is not None and r.output_tokens > 1]
    latency = [r.latency for r in done if r.latency is not None]
    tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": len(records) - len(done),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "wall_seconds": wall_seconds,
        "output_tokens": tokens,
        "output_tokens_per_second": tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "requests_per_second": len(done) / wall_seconds if wall_seconds > 0 else 0.0,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p99": percentile(tpot, 0.99),
        "latency_p50": percentile(latency, 0.5), "latency_p99": percentile(latency, 0.99),
        "latency_mean": statistics.fmean(latency) if latency else None,
    }


async def send_one(client: httpx.AsyncClient, model: str, prompt_ids: list[int],
                   max_tokens: int, adapter_index: int) -> RequestRecord:
    record = RequestRecord(adapter_index, ok=False)
    started = time.perf_counter()
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = chunk["error"]["message"][:200]
                    return record
                if chunk.get("choices") and chunk["choices"][0].get("text") and record.ttft is None:
                    record.ttft = time.perf_counter() - started
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
        record.latency = time.perf_counter() - started
        record.ok = record.output_tokens > 0
        if not record.ok:
            record.error = "no tokens generated"
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"[:200]
    return record


async def run_workload(url: str, requests: list[BenchRequest], spec: WorkloadSpec,
                       model_name: Callable[[int], str],
                       prompt_ids: Callable[[BenchRequest], list[int]] = lambda r: r.prompt_ids,
                       deadline: float = 600.0, progress: str = "") -> dict:
    """Send every request (closed loop or on its Poisson schedule); return the summary."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    records: list[RequestRecord] = []
    bar = tqdm(total=len(requests), desc=progress or "requests", leave=False)
    async with httpx.AsyncClient(base_url=url, timeout=deadline, limits=limits) as client:
        started = time.perf_counter()

        async def one(request: BenchRequest) -> None:
            if time.perf_counter() - started > deadline:
                records.append(RequestRecord(request.adapter_index, False, error="not sent"))
            else:
                records.append(await send_one(client, model_name(request.adapter_index),
                                              prompt_ids(request), request.max_tokens,
                                              request.adapter_index))
            bar.update()

        if spec.arrival == "closed":
            queue = list(reversed(requests))

            async def client_loop() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(client_loop() for _ in range(spec.concurrency)))
        else:
            async def scheduled(request: BenchRequest) -> None:
                await asyncio.sleep(max(0.0, request.send_at - (time.perf_counter() - started)))
                await one(request)

            await asyncio.gather(*(scheduled(r) for r in requests))
        wall = time.perf_counter() - started
    bar.close()
    return summarize(records, wall)
