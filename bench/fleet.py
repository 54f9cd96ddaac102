"""Placing requests on a fleet of replicas, each with a bounded resident set: which replica a
request lands on decides whether its adapter is there already or must be loaded.

Two parts:
- `simulate`: N replicas (no cluster), each an LRU resident set of `cap` adapters, a Poisson
  stream of requests over many adapters with Zipf popularity, and four placement policies:
  round robin, least loaded (fewest requests in flight), LoRA affinity as llm-d's
  `lora-affinity-scorer` does it from `vllm:lora_requests_info` (an adapter with requests in
  flight on a replica scores 1.0, a replica with room 0.8, one where it waits 0.6, else 0;
  plus a queue score, as the endpoint picker's profile in deploy/ weighs them), and residency
  affinity from `ptmoe_adapter_loaded` (1.0 where the adapter is resident). The router sees
  each replica's metrics as of its last scrape. Reported: how often a request finds its
  adapter resident, loads per second, and what the loads cost at the measured cold-load
  latency (bench/results/residency_peers.json: first token from disk less warm).
- `real_run`: two real replicas over one store on this machine, and a small router in this
  process that reads their real /metrics for the same policies, so the simulation's ordering
  can be checked against servers.

    python -m bench.fleet --parts simulation           # seconds
    python -m bench.fleet --parts real --work build/bench   # two servers, minutes"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import random
import shutil
import time
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from bench.provenance import provenance

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/fleet.py")

POLICIES = ("round-robin", "least-loaded", "lora-affinity", "resident-affinity")
RESULTS = Path(__file__).resolve().parent / "results"
# The endpoint picker's weights in deploy/kubernetes/inference-gateway.yaml.
QUEUE_WEIGHT, AFFINITY_WEIGHT = 1.0, 2.0


@dataclass(frozen=True)
class FleetSpec:
    replicas: int
    cap: int = 100  # adapters resident per replica
    adapters: int = 10_000
    zipf_exponent: float = 1.0
    rate_per_replica: float = 8.0  # requests per second
    service_seconds: float = 1.0  # mean time a request runs
    duration: float = 600.0  # seconds of traffic
    warmup: float = 120.0  # the first seconds fill the resident sets: not counted
    scrape_interval: float = 0.05  # how often the router reads the replicas' metrics
    seed: int = 0


@dataclass
class Replica:
    cap: int
    resident: OrderedDict = field(default_factory=OrderedDict)  # least recently used first
    running: dict = field(default_factory=lambda: defaultdict(int))  # adapter -> in flight
    in_flight: int = 0
    served: int = 0
    loads: int = 0

    def place(self, adapter: int) -> bool:
        """Run a request for `adapter` here; whether it was resident already."""
        hit = adapter in self.resident
        if not hit:
            self.loads += 1
            victim = next((a for a in self.resident if not self.running.get(a)), None)
            if len(self.resident) >= self.cap and victim is not None:
                del self.resident[victim]
            self.resident[adapter] = None
        self.resident.move_to_end(adapter)
        self.running[adapter] += 1
        self.in_flight += 1
        self.served += 1
        return hit

    def finish(self, adapter: int) -> None:
        self.running[adapter] -= 1
        if not self.running[adapter]:
            del self.running[adapter]
        self.in_flight -= 1


@dataclass(frozen=True)
class Seen:
    """One replica as the router last scraped it."""

    in_flight: int
    running: frozenset  # vllm:lora_requests_info's running (and, in vLLM 0.32, waiting) list
    resident: frozenset  # ptmoe_adapter_loaded's adapters
    max_lora: int


def scores(policy: str, adapter: int, seen: list[Seen]) -> list[float]:
    """The endpoint picker's weighted score of each replica for a request for `adapter`."""
    loads = [s.in_flight for s in seen]
    low, high = min(loads), max(loads)
    queue = [1.0 if high == low else (high - q) / (high - low) for q in loads]
    if policy == "least-loaded":
        return queue
    if policy == "resident-affinity":
        affinity = [1.0 if adapter in s.resident else 0.0 for s in seen]
    else:
        affinity = [lora_affinity(adapter, s) for s in seen]
    return [QUEUE_WEIGHT * q + AFFINITY_WEIGHT * a for q, a in zip(queue, affinity)]


def lora_affinity(adapter: int, seen: Seen) -> float:
    """llm-d's lora-affinity-scorer (v0.10.0) on the gauge's two lists."""
    active = waiting = seen.running
    if adapter in active:
        return 1.0
    if len(active) + len(waiting) < seen.max_lora:
        return 0.8
    if adapter in waiting:
        return 0.6
    return 0.0


def pick(policy: str, adapter: int, seen: list[Seen], turn: int, rng: random.Random) -> int:
    if policy == "round-robin":
        return turn % len(seen)
    values = scores(policy, adapter, seen)
    best = max(values)
    return rng.choice([i for i, v in enumerate(values) if v == best])  # ties at random


def simulate(spec: FleetSpec, policy: str, cold_load_ms: float) -> dict:
    rng = random.Random(spec.seed)  # the traffic: the same for every policy
    ties = random.Random(spec.seed + 1)
    weights = list(itertools.accumulate(1.0 / (r + 1) ** spec.zipf_exponent
                                        for r in range(spec.adapters)))
    replicas = [Replica(spec.cap) for _ in range(spec.replicas)]
    rate = spec.rate_per_replica * spec.replicas
    events: list[tuple[float, int, int, int]] = []  # (time, order, replica, adapter)
    now, order, hits, requests, next_scrape, seen = 0.0, 0, 0, 0, 0.0, []
    counting = False
    while True:
        now += rng.expovariate(rate)
        if now > spec.duration:
            break
        while events and events[0][0] <= now:
            _, _, index, done = heapq.heappop(events)
            replicas[index].finish(done)
        if now >= next_scrape:
            seen = [Seen(r.in_flight, frozenset(r.running), frozenset(r.resident), r.cap)
                    for r in replicas]
            next_scrape = now + spec.scrape_interval
        adapter = rng.choices(range(spec.adapters), cum_weights=weights)[0]
        index = pick(policy, adapter, seen, order, ties)
        if now >= spec.warmup and not counting:
            counting = True
            for replica in replicas:
                replica.loads = replica.served = 0
        hit = replicas[index].place(adapter)
        hits += hit and counting
        requests += counting
        runs = rng.expovariate(1 / spec.service_seconds) + (0 if hit else cold_load_ms / 1000)
        heapq.heappush(events, (now + runs, order, index, adapter))
        order += 1
    loads = sum(r.loads for r in replicas)
    served = [r.served for r in replicas]
    seconds = spec.duration - spec.warmup
    return {"policy": policy, "replicas": spec.replicas, "requests": requests,
            "hit_rate": hits / requests, "loads_per_second": loads / seconds,
            "loads_per_second_per_replica": loads / seconds / spec.replicas,
            # What the loads cost: the mean first-token delay they add to a request, and the
            # share of a replica's time spent loading.
            "added_ms_per_request": (requests - hits) / requests * cold_load_ms,
            "load_seconds_per_replica_second": loads * cold_load_ms / 1000
            / seconds / spec.replicas,
            "busiest_over_mean": max(served) / (sum(served) / len(served))}


def simulation_part(replica_counts: list[int], cold_load_ms: float, base: FleetSpec) -> dict:
    rows = []
    for n in replica_counts:
        spec = FleetSpec(**{**asdict(base), "replicas": n})
        for policy in POLICIES:
            started = time.perf_counter()
            rows.append(simulate(spec, policy, cold_load_ms))
            print(f"N={n:3d} {policy:18s} hit {rows[-1]['hit_rate']:.3f} "
                  f"loads/s {rows[-1]['loads_per_second']:8.1f} "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
    return {"spec": asdict(base), "cold_load_ms": cold_load_ms, "rows": rows}


def measured_cold_load_ms() -> float:
    peers = json.loads((RESULTS / "residency_peers.json").read_text())
    return peers["peers"]["cold_start"]["ptmoe"]["disk_minus_warm_p50_ms"]


# -- two real replicas behind a router that reads their /metrics ----------------------------

class MetricsRouter:
    """Reads each replica's /metrics every `interval` seconds and picks a replica per
    request with the simulation's policies."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, interval: float = 0.05,
                 seed: int = 0):
        self.urls, self.client, self.interval = urls, client, interval
        self.seen = [Seen(0, frozenset(), frozenset(), 1) for _ in urls]
        self.in_flight = [0] * len(urls)  # the router's own count, for least-loaded
        self.rng = random.Random(seed)
        self.turn = 0

    async def scrape_forever(self) -> None:
        while True:
            self.seen = list(await asyncio.gather(*(self._scrape(url) for url in self.urls)))
            await asyncio.sleep(self.interval)

    async def _scrape(self, url: str) -> Seen:
        families = {f.name: f for f in text_string_to_metric_families(
            (await self.client.get(f"{url}/metrics")).text)}
        lora = max(families["vllm:lora_requests_info"].samples, key=lambda s: s.value,
                   default=None)
        running = lora.labels["running_lora_adapters"] if lora else ""
        in_flight = sum(s.value for name in ("vllm:num_requests_running",
                                             "vllm:num_requests_waiting")
                        for s in families[name].samples)
        resident = {s.labels["adapter_name"] for s in families["ptmoe_adapter_loaded"].samples
                    if s.labels["level"] == "gpu"}
        cap = int(lora.labels["max_lora"]) if lora else 1
        return Seen(int(in_flight), frozenset(running.split(",")) - {""},
                    frozenset(resident), cap)

    def pick(self, policy: str, adapter: str) -> int:
        if policy == "least-loaded":  # the router's own count: what a proxy's least_conn uses
            low = min(self.in_flight)
            index = self.rng.choice([i for i, n in enumerate(self.in_flight) if n == low])
        else:
            index = pick(policy, adapter, self.seen, self.turn, self.rng)
        self.turn += 1
        return index


async def drive(urls: list[str], policy: str, adapters: list[str], concurrency: int,
                max_tokens: int) -> dict:
    async with _client() as client:
        router = MetricsRouter(urls, client)
        scraping = asyncio.create_task(router.scrape_forever())
        await asyncio.sleep(0.2)
        before = [await loads(client, url) for url in urls]
        queue = iter(adapters)
        placed = [0] * len(urls)
        started = time.perf_counter()

        async def worker():
            for adapter in queue:
                index = router.pick(policy, adapter)
                placed[index] += 1
                router.in_flight[index] += 1
                try:
                    response = await client.post(f"{urls[index]}/v1/completions", json={
                        "model": adapter, "prompt": "Once upon a time", "max_tokens": max_tokens,
                        "ignore_eos": True})
                    response.raise_for_status()
                finally:
                    router.in_flight[index] -= 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        scraping.cancel()
        after = [await loads(client, url) for url in urls]
    total_loads = sum(after) - sum(before)
    return {"policy": policy, "requests": len(adapters), "loads": total_loads,
            "hit_rate": 1 - total_loads / len(adapters), "seconds": seconds,
            "requests_per_second": len(adapters) / seconds,
            "busiest_over_mean": max(placed) / (sum(placed) / len(placed))}


def _client() -> httpx.AsyncClient:
    # Idle connections dropped before the server's keep-alive (5 s) ends them under a request.
    return httpx.AsyncClient(timeout=300, limits=httpx.Limits(keepalive_expiry=1.0))


async def loads(client: httpx.AsyncClient, url: str) -> float:
    families = text_string_to_metric_families((await client.get(f"{url}/metrics")).text)
    return sum(s.value for f in families if f.name == "ptmoe_adapter_loads"
               for s in f.samples if s.name == "ptmoe_adapter_loads_total")


async def flush(urls: list[str], names: list[str]) -> None:
    """Fill every replica's banks with adapters the traffic never asks for."""
    async with _client() as client:
        for url in urls:
            for name in names:
                (await client.post(f"{url}/v1/completions", json={
                    "model": name, "prompt": "Hi", "max_tokens": 1})).raise_for_status()


def real_part(args) -> dict:
    from bench.adapters import write_ptmoe_adapters
    from bench.server_process import start_server, stop_server
    from ptmoe_serve.base_model import default_cache_dir, ensure_default_model

    model_dir = ensure_default_model(default_cache_dir())
    store = args.work / "fleet-store"
    shutil.rmtree(store, ignore_errors=True)
    write_ptmoe_adapters(store, model_dir, model_dir.name, args.real_adapters + args.real_cap,
                         prompt_length=16, num_experts=2, rank=8, prefix="a")
    names = [f"a{i}" for i in range(args.real_adapters)]
    others = [f"a{i}" for i in range(args.real_adapters, args.real_adapters + args.real_cap)]
    rng = random.Random(args.seed)
    weights = [1.0 / (r + 1) for r in range(len(names))]
    traffic = rng.choices(names, weights=weights, k=args.real_requests)
    common = ["--model", str(model_dir), "--adapters", str(store), "--enforce-eager",
              "--max-model-len", "512", "--max-resident-adapters", str(args.real_cap),
              "--max-cpu-adapters", "0", "--no-fine-tune-worker", "--watch-interval", "0"]
    servers = []
    try:
        for i in range(2):  # one core each
            servers.append(start_server(common, args.work / f"fleet-replica{i}.log",
                                        env={"VLLM_CPU_OMP_THREADS_BIND": str(i),
                                             "OMP_NUM_THREADS": "1"}))
        urls = [s.url for s in servers]
        rows = []
        for policy in POLICIES:
            asyncio.run(flush(urls, others))
            rows.append(asyncio.run(drive(urls, policy, traffic, args.real_concurrency,
                                          args.real_max_tokens)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for server in servers:
            stop_server(server)
    return {"adapters": args.real_adapters, "cap": args.real_cap,
            "requests": args.real_requests, "concurrency": args.real_concurrency,
            "max_tokens": args.real_max_tokens, "zipf_exponent": 1.0, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["simulation", "real"],
                        choices=["simulation", "real"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--cap", type=int, default=FleetSpec.cap)
    parser.add_argument("--adapters", type=int, default=FleetSpec.adapters)
    parser.add_argument("--duration", type=float, default=FleetSpec.duration)
    parser.add_argument("--real-adapters", type=int, default=64)
    parser.add_argument("--real-cap", type=int, default=8)
    parser.add_argument("--real-requests", type=int, default=400)
    parser.add_argument("--real-concurrency", type=int, default=4)
    parser.add_argument("--real-max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    recorded = provenance()
    if "simulation" in args.parts:
        base = FleetSpec(replicas=0, cap=args.cap, adapters=args.adapters,
                         duration=args.duration, warmup=args.duration / 5, seed=args.seed)
        results["simulation"] = {**recorded, **simulation_part(
            args.replicas, measured_cold_load_ms(), base)}
    if "real" in args.parts:
        results["real"] = {**recorded, **real_part(args)}
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
