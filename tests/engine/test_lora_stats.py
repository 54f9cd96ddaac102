"""vLLM's LoRA gauge as the server keeps it: one series, the latest combination of adapters."""

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ptmoe_serve.engine.lora_stats import GAUGE, MAX_LORA, RUNNING, WAITING, _LatestSeries


def series(registry: CollectorRegistry) -> list[dict]:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return [s.labels for f in families if f.name == GAUGE for s in f.samples]


def test_a_new_combination_replaces_the_last_series():
    registry = CollectorRegistry()
    gauge = _LatestSeries(GAUGE, "Running stats on lora requests.", [MAX_LORA, WAITING, RUNNING],
                          registry)
    for running in ["a", "a", "a,b", ""]:
        gauge.labels(**{RUNNING: running, WAITING: running, MAX_LORA: 4}).set_to_current_time()
    assert series(registry) == [{MAX_LORA: "4", WAITING: "", RUNNING: ""}]
