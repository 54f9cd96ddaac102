"""What the routers of vLLM fleets read from a server: `vllm:lora_requests_info`, checked
against vLLM's own server serving a real PEFT LoRA adapter (`--enable-lora`), both parsed
from their /metrics: the same name, type, help and labels, the value a timestamp, the
adapter named as running while its request runs and dropped when it ends."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.adapters import write_lora_adapters
from bench.server_process import start_server
from bench.systems import vllm_command
from conftest import admin_headers
from helpers import stop_later

GAUGE = "vllm:lora_requests_info"
LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
PROMPT = "Once upon a time, there was a little"
VLLM_MAX_LORAS = 2


@pytest.fixture(scope="module")
def vllm_lora_server(model_dir, tmp_path_factory):
    """vLLM's own OpenAI server, with its LoRA support on and one LoRA adapter."""
    root = tmp_path_factory.mktemp("vllm-lora")
    folder = write_lora_adapters(root / "loras", model_dir, 1, 8, ["q_proj", "v_proj"])[0]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if not torch.cuda.is_available():
        env["VLLM_USE_AOT_COMPILE"] = "0"
    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
         "--enforce-eager", "--enable-lora", "--max-lora-rank", "8",
         "--max-loras", str(VLLM_MAX_LORAS), "--lora-modules", f"peft-lora={folder}",
         "--disable-uvicorn-access-log"], root / "vllm.log", command=vllm_command(), env=env)
    yield running
    stop_later(running)


def gauge(url: str):
    """The gauge's family, and its labels and value in its latest series (the one routers
    read: the greatest value), or None if it has no series yet."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    family = families[GAUGE]
    latest = max(family.samples, key=lambda s: s.value, default=None)
    return family, latest


def labels_while_running(url: str, models: list[str]) -> dict:
    """The latest series' labels once it names every one of `models` as running, each with a
    long streaming request kept open until then (a request that ended first would drop out:
    on a loaded machine one scrape may take as long as a short request)."""
    started = [threading.Event() for _ in models]
    stop = threading.Event()

    def stream(i: int):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
                "model": models[i], "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                started[i].set()
                if stop.is_set():
                    return  # the client leaves: the request is aborted

    with ThreadPoolExecutor(len(models)) as pool:
        streams = [pool.submit(stream, i) for i in range(len(models))]
        try:
            assert all(event.wait(60) for event in started)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                _, latest = gauge(url)
                running = latest.labels["running_lora_adapters"] if latest is not None else ""
                if set(running.split(",")) == set(models):
                    return latest.labels | {"value": latest.value}
                time.sleep(0.2)
        finally:
            stop.set()
            for streaming in streams:
                streaming.result()
    raise AssertionError(f"{GAUGE} never named {models} as running together")


def labels_when_idle(url: str) -> dict:
    """The latest series' labels once nothing runs (vLLM records one last step)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, latest = gauge(url)
        if not latest.labels["running_lora_adapters"]:
            return latest.labels
        time.sleep(0.2)
    raise AssertionError(f"{GAUGE} still names a running adapter")


def test_the_lora_gauge_is_vllms_own_and_names_the_running_adapter(server, vllm_lora_server):
    ours, theirs = gauge(server.url)[0], gauge(vllm_lora_server.url)[0]
    assert (ours.type, ours.documentation) == (theirs.type, theirs.documentation) == (
        "gauge", "Running stats on lora requests.")

    cap = httpx.get(f"{server.url}/v1/adapters", headers=admin_headers()).json()["max_resident"]
    for url, model, max_lora in [(vllm_lora_server.url, "peft-lora", VLLM_MAX_LORAS),
                                 (server.url, "top1", cap)]:
        running = labels_while_running(url, [model])
        assert set(running) - {"value"} == LABELS
        assert running["running_lora_adapters"] == model
        # vLLM 0.32 names an adapter with requests in flight in both lists (it writes each
        # adapter's count of waiting and of running requests, and the gauge lists the keys).
        assert running["waiting_lora_adapters"] == model
        assert running["max_lora"] == str(max_lora)
        # The value is when the series was last current: routers take the latest.
        assert abs(running["value"] - time.time()) < 60
        idle = labels_when_idle(url)
        assert (idle["running_lora_adapters"], idle["waiting_lora_adapters"]) == ("", "")
    # Here one series at a time: a new combination of adapters replaces the last.
    assert len(gauge(server.url)[0].samples) == 1


def test_the_lora_gauge_names_every_adapter_of_a_batch(server):
    """Several adapters at once: each named once, as vLLM joins its adapters' names."""
    names = ["top1", "dense", "dense-prob"]
    running = labels_while_running(server.url, names)["running_lora_adapters"].split(",")
    assert sorted(running) == sorted(names)
