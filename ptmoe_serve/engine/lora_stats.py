"""vLLM's per-LoRA request gauge, `vllm:lora_requests_info`, for PT-MoE adapters: what the
routers of vLLM fleets read to send a request where its adapter already runs (the Gateway API
Inference Extension's and llm-d's LoRA-affinity scorer, through KServe too).

vLLM counts a request as waiting or running for its LoRA adapter from the scheduler's events,
in its output processor, under the adapter's name on the request's state; its Prometheus
logger writes the gauge from those counts at every engine step it records, but creates it only
when vLLM's own LoRA support is on. Adapters never reach vLLM as LoRA requests here (the engine
would refuse them), so this names each adapter's engine requests to vLLM's accounting as they
are added, and gives vLLM's logger the gauge: the counts, label formats and update cadence are
vLLM's own code's. `max_lora` is the resident cap (--max-resident-adapters).

One difference, for bounded memory: vLLM keeps a series for every combination of adapters it
has ever reported (each is set to the time it was last current, and routers read the latest);
here a new combination replaces the previous one, so /metrics holds one series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

GAUGE = "vllm:lora_requests_info"
MAX_LORA, WAITING, RUNNING = "max_lora", "waiting_lora_adapters", "running_lora_adapters"


class AdapterRequestNames:
    """The adapter each engine request runs with, by the request id `generate` was given
    (vLLM's external id; each of an n>1 request's sequences carries it too)."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def add(self, request_id: str, adapter: str) -> None:
        self._names[request_id] = adapter

    def discard(self, request_id: str) -> None:
        self._names.pop(request_id, None)

    def get(self, request_id: str | None) -> str | None:
        return self._names.get(request_id) if request_id is not None else None


def track_adapter_requests(llm: AsyncLLM, names: AdapterRequestNames, max_lora: int,
                           registry: CollectorRegistry) -> bool:
    """Name adapter requests to vLLM's LoRA accounting, and give vLLM's Prometheus logger the
    LoRA gauge; False (nothing changed) if vLLM keeps no stats (--disable-log-stats) or its
    own LoRA support made the gauge already."""
    loggers = llm.logger_manager.stat_loggers if llm.logger_manager is not None else []
    prometheus = next((s for s in loggers if isinstance(s, PrometheusStatLogger)), None)
    if prometheus is None or prometheus.gauge_lora_info is not None:
        return False
    processor = llm.output_processor
    add_request = processor.add_request

    def add_named_request(request, *args, **kwargs):
        add_request(request, *args, **kwargs)
        name = names.get(request.external_req_id)
        state = processor.request_states.get(request.request_id)
        if name is not None and state is not None:
            state.lora_name = name

    processor.add_request = add_named_request
    prometheus.labelname_max_lora = MAX_LORA
    prometheus.labelname_waiting_lora_adapters = WAITING
    prometheus.labelname_running_lora_adapters = RUNNING
    prometheus.max_lora = max_lora
    prometheus.gauge_lora_info = _LatestSeries(GAUGE, "Running stats on lora requests.",
                                               [MAX_LORA, WAITING, RUNNING], registry)
    return True


class _LatestSeries:
    """A labelled gauge that keeps only the series last asked for."""

    def __init__(self, name: str, documentation: str, label_names: list[str],
                 registry: CollectorRegistry) -> None:
        self._gauge = Gauge(name, documentation, label_names, registry=registry)
        self._label_names = label_names
        self._current: list[str] | None = None

    def labels(self, **labels):
        values = [str(labels[name]) for name in self._label_names]
        if self._current is not None and values != self._current:
            self._gauge.remove(*self._current)
        self._current = values
        return self._gauge.labels(*values)
