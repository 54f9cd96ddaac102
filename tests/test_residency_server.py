"""A bounded resident set on a real server and the real model: a store of 33 adapters (one of
them pinned) and one broken folder behind `--max-resident-adapters 4`. Answers given while
adapters are evicted and read again equal transformers' (float32, greedy); concurrent first
requests load each adapter once per residency; a streaming request keeps its adapter while
others churn through the other slots; a cold request that finds every slot held waits, gets a
503 with Retry-After, and is served once a slot frees; a broken folder fails its first request
and nothing else; the pinned adapter never leaves."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bench.residency import metric
from bench.server_process import start_server
from conftest import TEXTS
from helpers import (reference_greedy, reference_prompt_logprobs, stop_later,
                     text_experts_adapter)
from ptmoe_serve.adapters.format import CONFIG_FILE, write_adapter
from ptmoe_serve.base_model import load_input_embeddings

ADMIN = "residency-admin-key"
CAPACITY = 4  # one of them pinned
WAIT_SECONDS = 12
ADAPTERS = [f"r{i:02d}" for i in range(32)]
AT_START: dict = {}
PROMPT = "Once upon a time, there was a little"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, tokenizer):
    root = tmp_path_factory.mktemp("residency")
    table = load_input_embeddings(model_dir)
    texts = [tokenizer.encode(t) for t in TEXTS]
    for i, name in enumerate([*ADAPTERS, "pinned"]):
        write_adapter(text_experts_adapter(table, [texts[i % 3], texts[(i + 1) % 3]], seed=i,
                                           prompt_length=4 + i % 3, rank=4),
                      root / "store" / name)
    (root / "store" / "broken").mkdir()
    (root / "store" / "broken" / CONFIG_FILE).write_text('{"peft_type": "PT_MOE"}')
    (root / "admin.key").write_text(ADMIN)
    return root


@pytest.fixture(scope="module")
def server(store, model_dir):
    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
         "--adapters", str(store / "store"), "--admin-api-key-file", str(store / "admin.key"),
         "--max-resident-adapters", str(CAPACITY), "--pin", "pinned",
         "--adapter-wait-seconds", str(WAIT_SECONDS), "--enforce-eager",
         "--no-fine-tune-worker"], store / "server.log")
    # What the server offers before any request, whichever test runs first.
    AT_START.update(models=openai.OpenAI(base_url=f"{running.url}/v1", api_key="none")
                    .models.list().data,
                    adapters_in_store=httpx.get(f"{running.url}/v1/models").json()[
                        "adapters_in_store"],
                    resident=metric(running.url, "ptmoe_adapters_resident"),
                    r00=adapter(running, "r00"))
    yield running
    stop_later(running)


def complete(server, model: str, max_tokens: int = MAX_TOKENS, prompt=PROMPT) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True})


def residencies(server) -> float:
    """Loads (from disk or the host) less evictions: each load starts a residency."""
    return (metric(server.url, "ptmoe_adapter_loads_total")
            - metric(server.url, "ptmoe_adapter_evictions_total"))


def adapter(server, name: str) -> dict:
    return httpx.get(f"{server.url}/v1/adapters/{name}",
                     headers={"authorization": f"Bearer {ADMIN}"}).json()


def test_start_up_reads_the_index_and_lists_every_adapter_before_any_is_asked(server):
    """The `openai` client lists what a user can call: every adapter in the store, the
    resident (pinned) one first with its card, the others by name, none read yet (as the
    server fixture saw them the moment the server was up)."""
    listed = AT_START["models"]
    assert [m.id for m in listed[1:]] == ["pinned", *sorted([*ADAPTERS, "broken"])]
    assert listed[1].model_dump()["adapter"]["resident"] is True
    assert listed[1].model_dump()["adapter"]["num_experts"] == 2
    assert {m.model_dump()["adapter"]["resident"] for m in listed[2:]} == {False}
    assert AT_START["adapters_in_store"] == len(ADAPTERS) + 2  # the broken folder too
    assert AT_START["resident"] == 1
    r00 = AT_START["r00"]
    assert r00 == {"object": "adapter", "name": "r00", "resident": False, "pinned": False,
                   "source": r00["source"]}


def test_answers_while_adapters_are_evicted_and_read_again_equal_transformers(
        server, store, hf_model, tokenizer):
    """24 adapters, each asked twice in a shuffled order, 8 requests at a time, through 3
    free slots: every answer is transformers' for that adapter."""
    order = ADAPTERS[:24] * 2
    random.Random(0).shuffle(order)
    evictions = metric(server.url, "ptmoe_adapter_evictions_total")
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda name: complete(server, name), order))
    ids = tokenizer.encode(PROMPT)
    for name, response in zip(order, responses):
        assert response.status_code == 200, response.text
        expected = reference_greedy(hf_model, store / "store" / name, ids, MAX_TOKENS)
        assert response.json()["choices"][0]["token_ids"] == expected, name
    assert metric(server.url, "ptmoe_adapter_evictions_total") - evictions >= 24 - CAPACITY
    assert metric(server.url, "ptmoe_adapters_resident") <= CAPACITY
    assert metric(server.url, "ptmoe_time_to_first_token_cold_seconds_count") >= 24


def test_concurrent_first_requests_load_each_adapter_once_per_residency(server):
    before = residencies(server)
    resident_before = metric(server.url, "ptmoe_adapters_resident")
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda name: complete(server, name, max_tokens=1),
                                  ADAPTERS * 2))
    assert [r.status_code for r in responses] == [200] * 64, \
        [r.text for r in responses if r.status_code != 200][:3]
    # Every load began a residency that an eviction ended or that lasts: no adapter was read
    # twice for one residency, however many of its requests came at once.
    after = residencies(server)
    assert after - before == metric(server.url, "ptmoe_adapters_resident") - resident_before


def test_a_streaming_request_keeps_its_adapter_while_others_churn(server, store, hf_model,
                                                                  tokenizer):
    import json

    tokens, first = [], threading.Event()

    def stream():
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300, json={
                "model": "r05", "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                "stream": True, "return_token_ids": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    tokens.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
                    first.set()

    evictions = metric(server.url, "ptmoe_adapter_evictions_total")
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        assert first.wait(60)
        for name in ADAPTERS[10:30]:  # through the two other free slots, one at a time
            assert complete(server, name, max_tokens=1).status_code == 200
        streaming.result()
    assert metric(server.url, "ptmoe_adapter_evictions_total") - evictions >= 18
    assert tokens == reference_greedy(hf_model, store / "store" / "r05",
                                      tokenizer.encode(PROMPT), 48)


def test_a_cold_request_finding_every_slot_held_waits_then_gets_503_then_is_served(server):
    stop = threading.Event()
    started = [threading.Event() for _ in range(CAPACITY - 1)]

    def hold(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300, json={
                "model": ADAPTERS[i], "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
                "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():
                started[i].set()
                if stop.is_set():
                    return  # the client leaves: vLLM aborts, the slot frees

    with ThreadPoolExecutor(CAPACITY - 1) as pool:
        holders = [pool.submit(hold, i) for i in range(CAPACITY - 1)]
        assert all(event.wait(60) for event in started)
        began = time.monotonic()
        refused = complete(server, "r31")
        waited = time.monotonic() - began
        stop.set()
        for holder in holders:
            holder.result()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert "--max-resident-adapters" in refused.json()["error"]["message"]
    assert waited >= WAIT_SECONDS - 1
    served = complete(server, "r31")
    assert served.status_code == 200, served.text


def test_a_broken_folder_fails_its_first_request_and_harms_nothing(server):
    before = complete(server, "r03").json()["choices"][0]["token_ids"]
    broken = complete(server, "broken")
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert "adapter 'broken' cannot be loaded" in error["message"] and error["param"] == "model"
    assert "adapter_model.safetensors" in error["message"]
    listed = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"Bearer {ADMIN}"},
                       params={"limit": 1000}).json()
    assert [f["name"] for f in listed["failed"]] == ["broken"]
    assert complete(server, "r03").json()["choices"][0]["token_ids"] == before


def test_the_pinned_adapter_never_left(server):
    pinned = adapter(server, "pinned")
    assert pinned["resident"] and pinned["pinned"]
    # Loaded at start-up, once: everything above churned around it.
    assert pinned["requests_served"] == 0
    assert complete(server, "pinned").status_code == 200
    assert adapter(server, "pinned")["loaded_at"] == pinned["loaded_at"]


def test_the_residency_gauge_names_each_resident_and_host_adapter(server):
    """`ptmoe_adapter_loaded`, for routers that place by residency: a series per adapter in
    the banks (level gpu) and per adapter decoded in the host tier (level cpu), the same set
    the management API lists; `max_lora` of vLLM's LoRA gauge is the resident cap."""
    from prometheus_client.parser import text_string_to_metric_families

    for name in ADAPTERS[:6]:  # the last four asked stay in the banks; the others, on the host
        assert complete(server, name, max_tokens=1).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics").text)}
    series = {(s.labels["adapter_name"], s.labels["level"], s.labels["pinned"]): s.value
              for s in families["ptmoe_adapter_loaded"].samples}
    assert set(series.values()) == {1.0}
    in_banks = {name for name, level, _ in series if level == "gpu"}
    on_host = {name for name, level, _ in series if level == "cpu"}
    listed = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"Bearer {ADMIN}"},
                       params={"limit": 1000}).json()["data"]
    assert in_banks == {a["name"] for a in listed if a["resident"]}
    assert in_banks == {"pinned", *ADAPTERS[3:6]}
    assert ("pinned", "gpu", "true") in series and ("r05", "gpu", "false") in series
    assert {"r00", "r01", "r02"} <= on_host and not on_host & in_banks
    assert len(on_host) <= CAPACITY  # --max-cpu-adapters defaults to the resident cap
    lora_info = families["vllm:lora_requests_info"].samples
    assert {s.labels["max_lora"] for s in lora_info} == {str(CAPACITY)}


def test_an_adapter_read_back_into_another_slot_reuses_its_cached_prefix(server, store, hf_model,
                                                                        tokenizer):
    """vLLM's prefix cache is keyed by what fixes the soft prompt (the adapter's name, version
    and routed tokens), not by where the adapter sits: evicted, its slot taken by another,
    read back into another slot, it replays its prompt from cached blocks, and answers as
    transformers does."""
    long_prompt = " ".join([PROMPT] * 20)  # over one KV block (128 positions on the CPU)
    ids = tokenizer.encode(long_prompt)
    expected = reference_greedy(hf_model, store / "store" / "r05", ids, MAX_TOKENS)
    # This prompt's greedy answer hardly depends on the soft prompt; its prompt logprobs do
    # (a request that asks for them reads no cached blocks, so it is made apart).
    scored = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "r05", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}).json()
    served = [lp[str(t)]["logprob"] for t, lp in zip(ids, scored["choices"][0]["prompt_logprobs"])]
    assert served == pytest.approx(
        reference_prompt_logprobs(hf_model, store / "store" / "r05", ids), abs=2e-3)
    # r02, r08, r11, r14 share r05's shape, so its bank: each round asks three of them (the
    # three free slots besides the pinned one's) and evicts r05, until r05 comes back
    # elsewhere.
    first = complete(server, "r05", prompt=long_prompt)
    assert first.json()["choices"][0]["token_ids"] == expected
    fillers = ["r02", "r08", "r11", "r14"]
    for round in range(4):
        before = adapter(server, "r05")["slot"]
        for name in fillers[round % 2:][:3]:
            assert complete(server, name, max_tokens=1).status_code == 200
        assert not adapter(server, "r05")["resident"]
        cards = [adapter(server, name) for name in fillers]
        taken = {card["slot"] for card in cards if card["resident"]}
        hits = metric(server.url, "vllm:prefix_cache_hits_total")
        again = complete(server, "r05", prompt=long_prompt)
        if before in taken and adapter(server, "r05")["slot"] != before:
            break
    else:
        raise AssertionError("r05 never came back to another slot while its own was taken")
    assert again.json()["choices"][0]["token_ids"] == expected
    # The whole blocks of [soft prompt; prompt] before its last token, from the cache.
    assert len(ids) + 6 > 128
    assert metric(server.url, "vllm:prefix_cache_hits_total") - hits >= 128
