"""The HTTP API through the official `openai` client and plain HTTP, against the real server."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_ROUTE_QUEUE_LIMIT, BASE, STORE, admin_headers, shared_admin_key_file
from helpers import reference_greedy, reference_prompt_logprobs

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300,
                         max_retries=0)


def metric_samples(server) -> list:
    text = httpx.get(f"{server.url}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric_value(server, name: str, **labels) -> float:
    return sum(s.value for s in metric_samples(server)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_models_lists_the_base_model_and_every_adapter_in_the_store(client, server):
    client.completions.create(model="dense", prompt="Hi", max_tokens=1)  # resident: its card
    listed = client.models.list()
    models = {m.id: m for m in listed.data}
    assert set(models) == {BASE, *STORE}
    in_store = httpx.get(f"{server.url}/v1/models").json()["adapters_in_store"]
    assert in_store == len(STORE)
    card = models["dense"].model_dump()
    assert card["parent"] == BASE and card["owned_by"] == "ptmoe_serve"
    assert card["adapter"]["num_experts"] == 3 and card["adapter"]["top_k"] == 3
    assert card["adapter"]["prompt_length"] == 8 and card["adapter"]["router_scaling"] == "none"
    assert models[BASE].model_dump()["adapter"] is None


def test_completion_usage_counts(client, tokenizer):
    result = client.completions.create(model="top1", prompt=PROMPT, max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert result.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7
    assert result.choices[0].finish_reason == "length"


def test_batched_prompts_answer_as_single_prompts(client):
    prompts = [PROMPT, "The capital of France is", "def add(a, b):"]
    batched = client.completions.create(model="top1", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in batched.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batched.choices):
        single = client.completions.create(model="top1", prompt=prompt, max_tokens=8,
                                           temperature=0)
        assert choice.text == single.choices[0].text


def test_chat(client, hf_model, adapters_dir):
    body = client.chat.completions.create(
        model="dense", max_tokens=12, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a colour."}]).model_dump()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 12
    # The adapter answered, system message and all: transformers' greedy tokens on [P; chat].
    assert choice["token_ids"] == reference_greedy(hf_model, adapters_dir / "dense",
                                                   body["prompt_token_ids"], 12)


@pytest.mark.parametrize("model", ["dense-prob", BASE])
def test_streaming_equals_non_streaming(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    messages = [{"role": "user", "content": "Tell me about cats."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                          temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_n_greater_than_one(client):
    result = client.completions.create(model="top1", prompt=[PROMPT, "Hello"], n=3,
                                       max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage.completion_tokens == 36
    assert len({c.text for c in result.choices[:3]}) > 1
    chat = client.chat.completions.create(model="french", n=2, max_tokens=5, temperature=1.0,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_seed_logprobs_echo(client):
    stopped = client.completions.create(model="top1", prompt="Count: 1, 2, 3,", max_tokens=30,
                                        temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop" and "," not in stopped.choices[0].text
    a, b = (client.completions.create(model="top1", prompt=PROMPT, max_tokens=10, temperature=1.0,
                                      seed=123) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    scored = client.completions.create(model="top1", prompt=PROMPT, max_tokens=5, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True})
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == scored.choices[0].text
    assert all(len(top) == 2 and max(top.values()) == lp
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    echoed = client.completions.create(model="top1", prompt=PROMPT, max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)
    chat = client.chat.completions.create(model="dense", max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
                                          messages=[{"role": "user", "content": "Hi"}])
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


def test_routing_shows_the_experts_that_fired(server):
    response = httpx.post(f"{server.url}/v1/routing", json={"model": "top1",
                                                             "prompt": [PROMPT, "2 + 2 ="]})
    assert response.status_code == 200, response.text
    routing = response.json()["data"]
    assert [r["prompt_index"] for r in routing] == [0, 1]
    for r in routing:
        p, w = r["expert_probabilities"], r["expert_weights"]
        assert sum(p) == pytest.approx(1.0)
        best = max(range(2), key=lambda i: p[i])
        assert w[best] == pytest.approx(p[best]) and w[1 - best] == 0.0
    dense = httpx.post(f"{server.url}/v1/routing", json={
        "model": "dense", "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert dense["data"][0]["expert_weights"] == [1.0, 1.0, 1.0]
    missing = httpx.post(f"{server.url}/v1/routing", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_routing_on_leading_tokens_gives_options_one_soft_prompt(server, tokenizer):
    """vllm_xargs.ptmoe_route_tokens: the router reads the question only, so each option of a
    multiple-choice question is scored under the same soft prompt."""
    question = tokenizer.encode("Question: which colour is the sky? Answer:")
    options = [tokenizer.encode(" blue"), tokenizer.encode(" green")]
    scored = []
    for option in options:
        response = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": "top1", "prompt": question + option, "max_tokens": 1, "echo": True,
            "logprobs": 0, "temperature": 0,
            "vllm_xargs": {"ptmoe_route_tokens": len(question)}})
        assert response.status_code == 200, response.text
        scored.append(response.json()["choices"][0]["logprobs"]["token_logprobs"])
    # The question's own tokens score the same under both options' requests.
    assert scored[0][1:len(question)] == pytest.approx(scored[1][1:len(question)], abs=1e-5)
    routing = httpx.post(f"{server.url}/v1/routing", json={
        "model": "top1", "prompt": [question + o for o in options],
        "route_tokens": len(question)}).json()["data"]
    assert routing[0]["expert_probabilities"] == routing[1]["expert_probabilities"]
    bad = httpx.post(f"{server.url}/v1/completions", json={
        "model": "top1", "prompt": "x", "vllm_xargs": {"ptmoe_route_tokens": -1}})
    assert bad.status_code == 400 and "ptmoe_route_tokens" in bad.json()["error"]["message"]


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-adapter", prompt="x")
    assert error.value.body["message"].startswith("The model `no-such-adapter` does not exist.")
    response = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert set(response.json()["error"]) >= {"message", "type", "code"}


@pytest.mark.parametrize("body, words", [
    ({"model": "top1", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "top1", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "top1", "prompt": "x", "n": "three"}, "n"),
    ({"model": "top1", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "top1", "prompt": 42}, "prompt"),
    ({"model": "top1"}, "prompt"),
    ({"model": "top1", "prompt": ""}, "prompt"),
    ({"model": "top1", "prompt": [[1, 2], []]}, "prompt is empty"),
    ({"model": "top1", "prompt": [5, 10**9]}, "1000000000"),
    ({"model": "top1", "prompt": "x", "max_tokens": 5000}, "max_model_len"),
    ({"model": "top1", "prompt": "x", "seed": 2**64}, "seed"),
    ({"model": "top1", "prompt": [7] * 1015}, "your prompt has 1015 tokens and 12 "
     "soft-prompt positions of adapter 'top1' (1027 in all)"),
    ({"model": "top1", "prompt": "x", "use_beam_search": True, "n": 2, "max_tokens": 2},
     "beam search is not supported with adapter 'top1'"),
])
def test_bad_requests_are_400_with_a_useful_message(server, body, words):
    for stream in (False, True):  # refused before any stream starts
        response = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream},
                              timeout=60)
        if stream and body.get("use_beam_search"):
            continue  # vLLM refuses streaming beam search for every model
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert words in error["message"] and error["type"].startswith("Bad")


def test_malformed_json_is_400(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "top1", "prompt"',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "top1", "messages": []})
    assert chat.status_code == 400


def test_bodies_over_the_limit_are_413_before_they_are_parsed(server):
    """8 MiB by default (--max-request-mb), 64 KiB for management calls: refused from the
    declared length, or from the bytes as they arrive when no length is declared; the server
    answers the next request as before."""
    limit = 8 * 1024 * 1024
    big = b'{"model": "top1", "prompt": "' + b"x" * limit + b'"}'

    def chunks(data: bytes, size: int = 1 << 20):
        for start in range(0, len(data), size):
            yield data[start:start + size]

    declared = httpx.post(f"{server.url}/v1/completions", content=big, timeout=60,
                          headers={"content-type": "application/json"})
    streamed = httpx.post(f"{server.url}/v1/completions", content=chunks(big), timeout=60,
                          headers={"content-type": "application/json"})
    management = httpx.post(f"{server.url}/v1/adapters", timeout=60, headers=admin_headers(),
                            json={"name": "x", "path": "/" + "p" * 70_000})
    for response, option in [(declared, "--max-request-mb"), (streamed, "--max-request-mb"),
                             (management, "management calls")]:
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and option in error["message"]
    assert "the limit is 65536 bytes" in management.json()["error"]["message"]
    # Under the limit, a body is parsed as ever (here: vLLM's own validation answers).
    fits = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": "top1", "prompt": "x" * 100_000, "max_tokens": 1})
    assert fits.status_code in (200, 400) and fits.json().get("error", {}).get("code") != \
        "request_too_large"
    ok = httpx.post(f"{server.url}/v1/completions", timeout=60,
                    json={"model": "top1", "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200


def wait_for_engine_idle(server, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if metric_value(server, "ptmoe_engine_requests_unfinished") == 0:
            return True
        time.sleep(0.2)
    return False


def test_client_disconnect_aborts_the_generation(server):
    max_tokens = 1000
    long_request = {"model": "top1", "prompt": PROMPT, "max_tokens": max_tokens,
                    "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**long_request, "stream": True}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data:"))
        next(lines)
        started = time.monotonic()
        for _ in range(10):
            next(lines)
        seconds_per_token = (time.monotonic() - started) / 10
        assert metric_value(server, "ptmoe_engine_requests_unfinished") == 1
    # Finishing would take (max_tokens - 11) more tokens: only an abort empties it in half that.
    patience = 0.5 * (max_tokens - 11) * seconds_per_token
    assert wait_for_engine_idle(server, patience), f"still generating after {patience:.1f} s"

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=long_request, timeout=1.5)
    assert wait_for_engine_idle(server, patience)


def test_metrics_hold_vllms_series_and_the_adapters_own(client, server):
    client.completions.create(model="dense", prompt=[PROMPT, "Hi", "Yo", "Hey"], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    names = {s.name for s in metric_samples(server)}
    assert {"vllm:time_to_first_token_seconds_count", "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc"} <= names
    assert metric_value(server, "ptmoe_requests_total", adapter="dense", outcome="finished") >= 4
    assert metric_value(server, "ptmoe_generation_tokens_total", adapter="dense") >= 12
    assert metric_value(server, "ptmoe_prompt_tokens_total", adapter="dense") >= 4
    assert metric_value(server, "ptmoe_e2e_request_latency_seconds_count", adapter="dense") >= 4
    assert metric_value(server, "ptmoe_time_to_first_token_seconds_count", adapter="dense") >= 4
    assert metric_value(server, "ptmoe_adapters_in_store") == len(STORE)
    assert 1 <= metric_value(server, "ptmoe_adapters_resident") <= len(STORE)
    # A name that does not exist never becomes a label.
    assert not any(s.labels.get("adapter") == "missing" for s in metric_samples(server))


def test_the_api_route_reports_its_routing_steps(api_route_server):
    client = openai.OpenAI(base_url=f"{api_route_server.url}/v1", api_key="unused")
    client.completions.create(model="dense", prompt=[PROMPT, "Hi", "Yo", "Hey"], max_tokens=1)
    assert metric_value(api_route_server, "ptmoe_routing_step_seconds_count") >= 1
    # The four prompts of one request were routed in one step.
    assert metric_value(api_route_server, "ptmoe_routing_batch_size_bucket", le="2.0") < \
        metric_value(api_route_server, "ptmoe_routing_batch_size_count")


@pytest.mark.parametrize("body, words", [
    # vLLM's own bound on prompts per request (VLLM_MAX_COMPLETION_PROMPTS).
    ({"prompt": [[1]] * 50_000, "max_tokens": 1}, "VLLM_MAX_COMPLETION_PROMPTS"),
    ({"prompt": ["Hi"] * 300, "max_tokens": 1}, "--max-sequences-per-request"),
    ({"prompt": ["Hi"] * 100, "n": 3, "max_tokens": 1}, "300 sequences"),
    ({"prompt": "Hi", "n": 300, "max_tokens": 1}, "--max-sequences-per-request"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "Hi", "stop": ["x" * 1000]}, "stop string of 1000 characters"),
    ({"prompt": "Hi", "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "n": 64, "max_tokens": 900, "logprobs": 20},
     "--max-logprobs-per-request"),
    ({"prompt": "Hi", "n": 256, "max_tokens": 1000, "logprobs": 5}, "logprobs"),
])
@pytest.mark.parametrize("model", ["top1", BASE])
def test_requests_over_a_bound_are_400_and_cost_nothing(server, body, words, model):
    """Each bound answers at once with a message naming it; nothing reaches the engine, and a
    request alongside is served as ever."""
    started = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": model, **body})
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"], response.text
    assert time.perf_counter() - started < 10
    assert wait_for_engine_idle(server, 5)
    ok = httpx.post(f"{server.url}/v1/completions", timeout=60,
                    json={"model": model, "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200


def test_chat_n_and_top_logprobs_are_bounded(server):
    for body, words in [({"n": 300}, "--max-sequences-per-request"),
                        ({"n": 64, "max_tokens": 900, "logprobs": True, "top_logprobs": 20},
                         "--max-logprobs-per-request")]:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "top1", "messages": [{"role": "user", "content": "Hi"}], **body})
        assert response.status_code == 400 and words in response.text, response.text


def test_a_full_queue_is_503_with_retry_after(api_route_server):
    """vLLM's admission limits (here --max-num-queued-reqs 4) answer 503 with Retry-After,
    streaming or not, while a request of four prompts runs; the running one is unharmed."""
    url = f"{api_route_server.url}/v1/completions"
    # Long enough to outlast the two refused requests on a busy machine (seconds).
    max_tokens = 300
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120) as client:
        running = threading.Event()

        def long_stream():
            with client.stream("POST", url, json={
                    "model": "dense", "prompt": [PROMPT] * API_ROUTE_QUEUE_LIMIT,
                    "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as response:
                # A slow reader gets several tokens in one chunk: count them by the usage.
                tokens = None
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        running.set()
                        usage = json.loads(line[len("data: "):]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
                return response.status_code, tokens

        first = pool.submit(long_stream)
        assert running.wait(60)
        for stream in (False, True):
            refused = httpx.post(url, timeout=60, json={
                "model": "top1", "prompt": "Hi", "max_tokens": 1, "stream": stream})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "try again" in refused.json()["error"]["message"]
        assert not first.done()
        assert first.result() == (200, max_tokens * API_ROUTE_QUEUE_LIMIT)
    assert httpx.post(url, timeout=60, json={"model": "top1", "prompt": "Hi",
                                              "max_tokens": 1}).status_code == 200


def test_management_needs_the_admin_key_generated_at_start(server):
    """Started without keys, the server still guards management: by the admin key it wrote
    into its cache folder, readable by its user alone."""
    assert shared_admin_key_file().stat().st_mode & 0o077 == 0
    for headers in ({}, {"authorization": "Bearer"}, {"authorization": "Bearer wrong"}):
        refused = httpx.get(f"{server.url}/v1/adapters", headers=headers)
        assert refused.status_code == 401 and "admin key" in refused.json()["error"]["message"]
    listed = httpx.get(f"{server.url}/v1/adapters", headers=admin_headers())
    assert listed.status_code == 200 and "top1" in [a["name"] for a in listed.json()["data"]]
    assert "admin.key" in server.log.read_text()


def test_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/no/such/path").status_code == 404


# -- what vLLM's serving layer brings to adapters ---------------------------------------------

def assert_shaped_by(hf_model, adapters_dir, model: str, prompt: list[int],
                     prompt_logprobs: list[dict | None]) -> None:
    """The request ran under the adapter's soft prompt: its prompt logprobs are transformers'
    on [P; prompt]. (A constrained generation's own logprobs are of the constrained
    distribution, which transformers cannot give without the grammar.)"""
    served = [None if lp is None else lp[str(t)]["logprob"]
              for t, lp in zip(prompt, prompt_logprobs)]
    expected = reference_prompt_logprobs(hf_model, adapters_dir / model, prompt)
    assert served == pytest.approx(expected, abs=2e-3), model


def chat_with_prompt_logprobs(client, **request) -> tuple[dict, list[int], list]:
    """A greedy chat completion, its prompt's token ids and their logprobs."""
    body = client.chat.completions.create(
        temperature=0, extra_body={"return_token_ids": True, "prompt_logprobs": 0},
        **request).model_dump()
    return body["choices"][0], body["prompt_token_ids"], body["prompt_logprobs"]


def test_json_schema_response_format(client, hf_model, adapters_dir):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    choice, prompt, prompt_logprobs = chat_with_prompt_logprobs(
        client, model="contact-card", max_tokens=40,
        messages=[{"role": "user", "content": "Name a city in France."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema}})
    answer = json.loads(choice["message"]["content"])
    assert set(answer) == {"city"} and isinstance(answer["city"], str)
    assert_shaped_by(hf_model, adapters_dir, "contact-card", prompt, prompt_logprobs)


def test_structured_outputs_choice(client, tokenizer, hf_model, adapters_dir):
    choices = ["red", "green", "blue"]
    prompt = "My favourite colour is"
    for model in ("dense", "french"):
        result = client.completions.create(
            model=model, prompt=prompt, max_tokens=5, temperature=0,
            extra_body={"structured_outputs": {"choice": choices}, "prompt_logprobs": 0})
        choice = result.choices[0].model_dump()
        assert choice["text"] in choices
        assert_shaped_by(hf_model, adapters_dir, model, tokenizer.encode(prompt),
                         choice["prompt_logprobs"])


def test_named_tool_choice_returns_that_tool_call(client, hf_model, adapters_dir):
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}
    choice, prompt, prompt_logprobs = chat_with_prompt_logprobs(
        client, model="top1", max_tokens=60, tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert choice["message"]["tool_calls"], choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    # vLLM's hermes parser holds the arguments to JSON, not to the tool's schema.
    json.loads(call["function"]["arguments"])
    assert_shaped_by(hf_model, adapters_dir, "top1", prompt, prompt_logprobs)


def test_logit_bias_takes_effect(client, tokenizer):
    (target,) = tokenizer.encode(" banana")
    plain = client.completions.create(model="top1", prompt=PROMPT, max_tokens=1, temperature=0)
    assert plain.choices[0].text != " banana"
    biased = client.completions.create(model="top1", prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(target): 100})
    assert biased.choices[0].text == " banana"


def test_tokenize_and_detokenize(server, tokenizer):
    ids = httpx.post(f"{server.url}/tokenize", json={"model": "top1", "prompt": PROMPT}).json()
    assert ids["tokens"] == tokenizer.encode(PROMPT)
    text = httpx.post(f"{server.url}/detokenize", json={"model": "top1", "tokens": ids["tokens"]})
    assert text.json()["prompt"] == PROMPT


def test_responses_api_answers_with_an_adapter(client, tokenizer, hf_model, adapters_dir):
    """The Responses API renders its input as chat does: the adapter's greedy answer is
    transformers' on [P; that prompt]."""
    response = client.responses.create(model="french", input="Say hello.", max_output_tokens=12,
                                       temperature=0)
    assert response.model == "french"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                           add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = reference_greedy(hf_model, adapters_dir / "french", prompt, 12)
    assert response.output_text == tokenizer.decode(expected, skip_special_tokens=True)
