"""The project's Prometheus series, labelled by adapter, registered beside vLLM's `vllm:*`
series in the one registry that vLLM's `/metrics` serves.

Only requests that reach the engine are counted, so the adapter label takes only the names of
resident adapters (and the base model's): a client cannot grow the label set, and an adapter's
series go when it is unloaded or evicted, so they are bounded by the resident set."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ptmoe_serve.adapters.residency import LoadObserver, ResidentSet

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUTING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
LOAD_SOURCES = ("disk", "host")
OUTCOMES = ("finished", "aborted", "error")


class Metrics:
    def __init__(self, registry: CollectorRegistry, adapters_resident: Callable[[], int],
                 adapters_in_store: Callable[[], int], engine_requests: Callable[[], int],
                 bank_bytes: Callable[[], int]) -> None:
        r = registry
        self.requests = Counter(
            "ptmoe_requests", "Engine requests (one per prompt) by adapter and outcome: "
            "finished, aborted (the client went away) or error.",
            ["adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter(
            "ptmoe_prompt_tokens", "Prompt tokens processed (soft-prompt positions not included).",
            ["adapter"], registry=r)
        self.generation_tokens = Counter(
            "ptmoe_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.e2e_latency = Histogram(
            "ptmoe_e2e_request_latency_seconds", "Time from request to last token.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "ptmoe_time_to_first_token_seconds", "Time from request to first generated token.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.routing_step = Histogram(
            "ptmoe_routing_step_seconds", "Time of one batched routing step in the API process "
            "(the api route; on the engine route it runs in vLLM's workers).",
            buckets=ROUTING_BUCKETS, registry=r)
        self.routing_batch_size = Histogram(
            "ptmoe_routing_batch_size", "Prompts routed together in one step.",
            buckets=BATCH_BUCKETS, registry=r)
        self.time_to_first_token_cold = Histogram(
            "ptmoe_time_to_first_token_cold_seconds", "Time from request to first generated "
            "token, for requests that had to load their adapter first (counted in "
            "ptmoe_time_to_first_token_seconds too).", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("ptmoe_adapters_resident", "Adapters resident in the banks (at most "
              "--max-resident-adapters).", registry=r).set_function(adapters_resident)
        Gauge("ptmoe_adapters_in_store", "Adapters the store serves, resident or not.",
              registry=r).set_function(adapters_in_store)
        self.adapter_loads = Counter(
            "ptmoe_adapter_loads", "Adapters made resident for a request or a pin, by where "
            "they came from: disk (read and checked), host (decoded already).", ["source"],
            registry=r)
        self.adapter_load_seconds = Histogram(
            "ptmoe_adapter_load_seconds", "Time to make an adapter resident, by source.",
            ["source"], buckets=LOAD_BUCKETS, registry=r)
        self.adapter_evictions = Counter(
            "ptmoe_adapter_evictions", "Adapters evicted from the banks to make room.",
            registry=r)
        self.route_scope_fallbacks = Counter(
            "ptmoe_route_scope_fallback", "Chats under a first_turn scope routed on their whole "
            "prompt instead: turn 1's rendering was not a token prefix of the prompt (a "
            "template that rewrites earlier turns, a prompt truncated on the left).", registry=r)
        self.fine_tune_worker_restarts = Counter(
            "ptmoe_fine_tune_worker_restarts", "Fine-tuning workers started again after the "
            "one before died (killed, out of memory, crashed).", registry=r)
        for source in LOAD_SOURCES:
            self.adapter_loads.labels(source)
            self.adapter_load_seconds.labels(source)
        Gauge("ptmoe_adapter_bank_bytes", "Bytes the adapter banks take on the routing device "
              "(in each engine worker on the engine route).",
              registry=r).set_function(bank_bytes)
        Gauge("ptmoe_engine_requests_unfinished", "Requests the vLLM engine holds (per prompt).",
              registry=r).set_function(engine_requests)
        self.requests_running = Gauge(
            "ptmoe_requests_running", "Engine requests accepted and not yet finished.",
            registry=r)
        self.server = Info(
            "ptmoe_server", "The base model and where the routing step runs (engine or api).",
            registry=r)

    def watch_store(self, store_writable: Callable[[], bool], registry: CollectorRegistry
                    ) -> None:
        Gauge("ptmoe_store_writable", "1 while the adapter store takes changes; 0 when it is "
              "read-only or the last change found it full or read-only (what to watch for).",
              registry=registry).set_function(lambda: float(store_writable()))

    def watch_residency(self, resident: ResidentSet, registry: CollectorRegistry) -> None:
        registry.register(_ResidencyCollector(resident))

    def forget(self, adapter: str) -> None:
        """Remove an unloaded adapter's series (a replace keeps them: the name lives on)."""
        for metric in (self.prompt_tokens, self.generation_tokens, self.e2e_latency,
                       self.time_to_first_token):
            _remove(metric, adapter)
        for outcome in OUTCOMES:
            _remove(self.requests, adapter, outcome)

    def residency_observer(self) -> LoadObserver:
        def loaded(source: str, seconds: float) -> None:
            self.adapter_loads.labels(source).inc()
            self.adapter_load_seconds.labels(source).observe(seconds)

        return LoadObserver(loaded, lambda name: self.adapter_evictions.inc())

    def observe_routing_step(self, batch_size: int, seconds: float) -> None:
        self.routing_step.observe(seconds)
        self.routing_batch_size.observe(batch_size)


class _ResidencyCollector(Collector):
    """`ptmoe_adapter_loaded`: one series per adapter in the banks (level "gpu": the tier an
    engine step reads, whatever the device) or decoded in the host tier (level "cpu"), 1 while
    it is there, gone when it leaves; shaped like the `vllm:lora_adapter_loaded` proposed to
    vLLM (labels adapter_name, level, pinned), for routers that place requests by residency.
    Bounded by --max-resident-adapters plus --max-cpu-adapters."""

    def __init__(self, resident: ResidentSet) -> None:
        self.resident = resident

    def collect(self):
        family = GaugeMetricFamily(
            "ptmoe_adapter_loaded", "Adapters resident in the banks (level gpu) or kept "
            "decoded in host memory (level cpu).", labels=["adapter_name", "level", "pinned"])
        pinned = self.resident.pinned
        for entry in self.resident.registry.entries():
            family.add_metric([entry.name, "gpu", _bool(entry.name in pinned)], 1)
        for name in self.resident.host_names():
            family.add_metric([name, "cpu", "false"], 1)
        yield family


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never observed
        pass
