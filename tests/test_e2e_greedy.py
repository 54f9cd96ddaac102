"""The server's greedy output equals Hugging Face transformers' for the same adapter, token for
token, in float32: transformers generates from inputs_embeds = [P; token embeddings], with P
computed by the test's own reference of the paper's routing, straight from the adapter files."""

import httpx
import pytest

from conftest import BASE, E2E_ADAPTERS, SHIPPED
from helpers import reference_greedy, reference_prompt_logprobs, stop_later

MAX_TOKENS = 20
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, there was a little", "My favourite food is"]
QUESTIONS = ["What is the capital of Germany?", "Give me three tips for sleeping well."]
MODELS = [*E2E_ADAPTERS, *SHIPPED, BASE]


def test_both_routes_run_the_compiled_model_by_default(routed_server):
    """What the tests below compare with transformers is the model as users get it: compiled
    by vLLM (torch.compile) on the CPU too, the setting that runs at the bare model's speed.
    vLLM prints its engine configuration at start-up."""
    log = routed_server.log.read_text()
    assert "enforce_eager=False" in log and "enforce_eager=True" not in log


def transformers_greedy(hf_model, adapters_dir, model: str, ids: list[int]) -> list[int]:
    return reference_greedy(hf_model, None if model == BASE else adapters_dir / model, ids,
                            MAX_TOKENS)


@pytest.mark.parametrize("model", MODELS)
def test_completions_with_token_ids_equal_transformers(routed_server, hf_model, tokenizer,
                                                       adapters_dir, model):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    response = httpx.post(f"{routed_server.url}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(prompts)))
    for ids, choice in zip(prompts, choices):
        expected = transformers_greedy(hf_model, adapters_dir, model, ids)
        assert choice["token_ids"] == expected, (model, tokenizer.decode(ids))
        assert choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("model", MODELS)
def test_chat_equals_transformers(routed_server, hf_model, tokenizer, adapters_dir, model):
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        response = httpx.post(f"{routed_server.url}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True})
        assert response.status_code == 200, response.text
        body = response.json()
        chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)["input_ids"]
        assert body["prompt_token_ids"] == chat_ids
        expected = transformers_greedy(hf_model, adapters_dir, model, chat_ids)
        assert body["choices"][0]["token_ids"] == expected, (model, question)


@pytest.mark.parametrize("model", ["top1", "dense", "arithmetic", BASE])
def test_echo_logprobs_and_prompt_logprobs_equal_transformers(server, hf_model, tokenizer,
                                                              adapters_dir, model):
    """What lm-eval's log-likelihood tasks read (echo + logprobs) and vLLM's prompt_logprobs,
    with the T soft-prompt positions stripped: position j scores prompt token j."""
    ids = tokenizer.encode(PROMPTS[2])
    expected = reference_prompt_logprobs(hf_model, None if model == BASE else adapters_dir / model,
                                         ids)
    response = httpx.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
        "logprobs": 1, "prompt_logprobs": 0})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    echoed = choice["logprobs"]["token_logprobs"][:len(ids)]
    assert choice["logprobs"]["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
    served = echoed if model != BASE else echoed[1:]
    assert served == pytest.approx(expected, abs=2e-3)
    prompt_logprobs = choice["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids)
    from_prompt_logprobs = [prompt_logprobs[j][str(t)]["logprob"] for j, t in enumerate(ids)
                            if prompt_logprobs[j] is not None]
    assert from_prompt_logprobs == pytest.approx(expected, abs=2e-3)
    assert response.json()["usage"]["prompt_tokens"] == len(ids)


def test_the_api_route_refuses_prompt_logprobs_for_adapters(api_route_server):
    response = httpx.post(f"{api_route_server.url}/v1/completions", timeout=60, json={
        "model": "top1", "prompt": "Hello", "max_tokens": 1, "echo": True, "logprobs": 1})
    assert response.status_code == 400
    assert "--routing-location engine" in response.json()["error"]["message"]


def test_adapters_change_the_answer(server):
    """Guards the comparisons above against adapters too weak to matter."""
    texts = {}
    for model in MODELS:
        response = httpx.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": model, "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0})
        texts[model] = response.json()["choices"][0]["text"]
    assert len(set(texts.values())) == len(MODELS), texts


@pytest.fixture(scope="module")
def tensor_parallel_server(model_dir, adapters_dir, tmp_path_factory):
    """Three tensor-parallel ranks (the model's 9 attention heads allow 1, 3 or 9) on this
    machine's cores; each rank holds the whole adapter bank."""
    from bench.server_process import start_server
    from conftest import MAX_MODEL_LEN, routing_location_of

    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--adapters", str(adapters_dir),
         # Its generated admin key in a folder of its own, not the user's cache.
         "--cache-dir", str(tmp_path_factory.mktemp("tp-cache")),
         "--max-model-len", str(MAX_MODEL_LEN), "--tensor-parallel-size", "3",
         # Three ranks compiling on two cores would take many minutes.
         "--enforce-eager", "--no-fine-tune-worker"],
        tmp_path_factory.mktemp("tp") / "server.log",
        # One OpenMP thread a rank: three ranks of two threads each on two cores spend most
        # of their time waiting on each other (a request took 7x as long).
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
             "OMP_NUM_THREADS": "1"})
    assert routing_location_of(running) == "engine"
    yield running
    stop_later(running)


def test_tensor_parallel_ranks_route_in_the_engine_exactly(tensor_parallel_server, hf_model,
                                                           tokenizer, adapters_dir):
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    # Slow here (three ranks on two cores): one dense adapter and one trained one.
    for model in ["dense", "contact-card"]:
        response = httpx.post(f"{tensor_parallel_server.url}/v1/completions", timeout=300,
                              json={"model": model, "prompt": prompts, "max_tokens": MAX_TOKENS,
                                    "temperature": 0, "return_token_ids": True})
        assert response.status_code == 200, response.text
        for ids, choice in zip(prompts, response.json()["choices"]):
            assert choice["token_ids"] == transformers_greedy(hf_model, adapters_dir, model, ids)
