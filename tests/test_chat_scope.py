"""A chat's routing scope on the shared servers: under an adapter whose `route_scope` is
`first_turn` (the store's `top1-first-turn`: `top1`'s weights), a conversation's later turns are
routed on turn 1's prompt, so vLLM's prefix cache serves the turns before the new one, and the
answers are transformers' on [P; turn k's prompt] with P routed on turn 1's prompt."""

import httpx
import openai
import pytest

from bench.residency import metric
from conftest import admin_headers
from helpers import reference_greedy, reference_prompt_logprobs
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE

ADAPTER = "top1"  # probability scaling: its soft prompt moves with every routed token
FIRST_TURN = "top1-first-turn"  # the same weights, route_scope "first_turn" (conftest)
NONE_SCALED = "french"  # router_scaling "none", route_scope "prompt"
MAX_TOKENS = 6
# The Responses API gives no prompt logprobs: answers long enough that the soft prompt shows.
RESPONSE_TOKENS = 24
KV_BLOCK = 128  # positions, on the CPU
# Over one KV block: turn 1's prompt is over 128 positions.
SYSTEM = " ".join(["You are the booking assistant of a small hotel by the sea."] * 14)
QUESTIONS = ["Do you have a room for two nights?", "Is breakfast included?",
             "Can we bring a dog?", "How far is the beach?"]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300,
                         max_retries=0)


def rendered(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=True)["input_ids"]


def served_logprobs(body: dict) -> list[float]:
    """A chat response's prompt logprobs, one a prompt token."""
    return [lp[str(t)]["logprob"]
            for t, lp in zip(body["prompt_token_ids"], body["prompt_logprobs"])]


def chat(server, model: str, messages, **extra) -> dict:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_conversations_later_turns_reuse_the_prefix_cache_and_answer_as_transformers(
        routed_server, adapters_dir, tokenizer, hf_model):
    """On both routes (routed_server)."""
    server = routed_server
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    turn_one = len(rendered(tokenizer, messages))
    assert turn_one > KV_BLOCK
    for turn, question in enumerate(QUESTIONS, start=1):
        if turn > 1:
            messages.append({"role": "user", "content": question})
        prompt = rendered(tokenizer, messages)
        hits = metric(server.url, "vllm:prefix_cache_hits_total")
        answer = chat(server, FIRST_TURN, messages)
        hit = metric(server.url, "vllm:prefix_cache_hits_total") - hits
        assert answer["prompt_token_ids"] == prompt
        expected = reference_greedy(hf_model, adapters_dir / ADAPTER, prompt, MAX_TOKENS,
                                    route_tokens=turn_one)
        assert answer["choices"][0]["token_ids"] == expected, turn
        if turn > 1:
            # Turn 1's whole blocks at least: [soft prompt; system prompt; question].
            assert hit >= KV_BLOCK, (turn, hit)
            # The adapter's own scope, or any adapter's asked for by the request.
            asked = chat(server, ADAPTER, messages, vllm_xargs={"ptmoe_route_scope": "first_turn"})
            assert asked["choices"][0]["token_ids"] == expected
        messages.append({"role": "assistant",
                         "content": answer["choices"][0]["message"]["content"]})
    card = httpx.get(f"{server.url}/v1/adapters/{FIRST_TURN}", headers=admin_headers()).json()
    assert card["route_scope"] == "first_turn"
    routing = httpx.post(f"{server.url}/v1/routing", json={
        "model": FIRST_TURN, "messages": messages[:-1]}, timeout=60).json()["data"][0]
    assert routing["route_scope"] == "first_turn" and routing["routed_tokens"] == turn_one
    whole = httpx.post(f"{server.url}/v1/routing", json={
        "model": ADAPTER, "messages": messages[:-1]}, timeout=60).json()["data"][0]
    assert whole["route_scope"] == "prompt"
    assert whole["routed_tokens"] == whole["prompt_tokens"] > turn_one


def test_a_later_turns_prompt_logprobs_are_transformers_routed_on_turn_one(
        server, adapters_dir, tokenizer, hf_model):
    """Sharper than greedy tokens: every prompt position's logprob, on the turn-1 routing and
    not on the whole prompt's."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": "Yes, we do."},
                {"role": "user", "content": QUESTIONS[1]}]
    body = chat(server, FIRST_TURN, messages, prompt_logprobs=0)
    prompt, served = body["prompt_token_ids"], served_logprobs(body)
    turn_one = len(rendered(tokenizer, messages[:2]))
    on_turn_one = reference_prompt_logprobs(hf_model, adapters_dir / ADAPTER, prompt,
                                            route_tokens=turn_one)
    on_everything = reference_prompt_logprobs(hf_model, adapters_dir / ADAPTER, prompt)
    assert served == pytest.approx(on_turn_one, abs=2e-3)
    assert served != pytest.approx(on_everything, abs=2e-3)


def test_an_explicit_route_token_count_wins_and_an_unknown_scope_is_refused(
        server, adapters_dir, hf_model, client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": QUESTIONS[1]}]
    body = chat(server, FIRST_TURN, messages, vllm_xargs={"ptmoe_route_tokens": 9},
                prompt_logprobs=0)
    assert served_logprobs(body) == pytest.approx(reference_prompt_logprobs(
        hf_model, adapters_dir / ADAPTER, body["prompt_token_ids"], route_tokens=9), abs=2e-3)
    for request in (
            lambda: client.chat.completions.create(
                model=ADAPTER, messages=messages, max_tokens=1,
                extra_body={"vllm_xargs": {"ptmoe_route_scope": "whole"}}),
            lambda: client.completions.create(
                model=ADAPTER, prompt="Hello", max_tokens=1,
                extra_body={"vllm_xargs": {"ptmoe_route_scope": "turns"}})):
        with pytest.raises(openai.BadRequestError, match="ptmoe_route_scope must be one of "
                                                         "'prompt', 'first_turn'"):
            request()
    config = (adapters_dir / ADAPTER / CONFIG_FILE).read_text().rstrip().rstrip("}")
    refused = httpx.put(f"{server.url}/v1/adapters/bad-scope", headers=admin_headers(), files={
        CONFIG_FILE: (CONFIG_FILE, (config + ', "route_scope": "whole"}').encode()),
        WEIGHTS_FILE: (WEIGHTS_FILE, (adapters_dir / ADAPTER / WEIGHTS_FILE).read_bytes())})
    assert refused.status_code == 400 and "route_scope" in refused.text, refused.text


def test_the_responses_api_routes_a_previous_responses_conversation_on_its_first_turn(
        server, client, adapters_dir, tokenizer, hf_model):
    question = "What time is breakfast served?"
    first = client.responses.create(model=FIRST_TURN, input=QUESTIONS[0], instructions=SYSTEM,
                                    max_output_tokens=RESPONSE_TOKENS, temperature=0)
    hits = metric(server.url, "vllm:prefix_cache_hits_total")
    # Instructions are not carried over from a previous response (OpenAI's rule): given
    # again, as the conversation's system prompt.
    second = client.responses.create(model=FIRST_TURN, input=question, instructions=SYSTEM,
                                     previous_response_id=first.id,
                                     max_output_tokens=RESPONSE_TOKENS, temperature=0,
                                     include=["message.output_text.logprobs"], top_logprobs=0)
    hit = metric(server.url, "vllm:prefix_cache_hits_total") - hits
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    turn_one = len(rendered(tokenizer, messages))
    messages += [{"role": "assistant", "content": first.output_text},
                 {"role": "user", "content": question}]
    prompt = rendered(tokenizer, messages)
    expected = reference_greedy(hf_model, adapters_dir / ADAPTER, prompt, RESPONSE_TOKENS,
                                route_tokens=turn_one)
    assert second.output_text == tokenizer.decode(expected, skip_special_tokens=True)
    # Sharper than the text: each answer token's logprob, as transformers scores it after
    # [P; prompt; the answer before it], P routed on turn 1's prompt.
    served = [token.logprob for token in second.output[0].content[0].logprobs]
    scored = reference_prompt_logprobs(hf_model, adapters_dir / ADAPTER, prompt + expected,
                                       route_tokens=turn_one)[-len(expected):]
    assert served[:len(expected)] == pytest.approx(scored[:len(served)], abs=2e-3)
    assert hit >= KV_BLOCK


def kept_experts(server, model: str, messages) -> list[int]:
    """The experts the router keeps for this chat, as /v1/routing shows them."""
    routing = httpx.post(f"{server.url}/v1/routing", json={"model": model, "messages": messages},
                         timeout=60).json()["data"][0]
    return [i for i, weight in enumerate(routing["expert_weights"]) if weight]


def test_prompts_that_keep_the_same_experts_share_a_none_scaled_adapters_cached_prefix(
        routed_server, adapters_dir, tokenizer, hf_model):
    """Under `router_scaling: "none"` the soft prompt is fixed by which experts the router
    keeps: another conversation's turn 1 over the same system prompt, and a later turn routed
    on its whole prompt (`french`'s scope is `prompt`), reuse the cached [P; system prompt] when
    their router keeps the same experts. On both routes (routed_server)."""
    server = routed_server
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    later = [*first, {"role": "assistant", "content": "Yes, we do."},
             {"role": "user", "content": QUESTIONS[1]}]
    # What the test stands on: one routing for all three (a 200-token system prompt dominates
    # the mean embedding).
    assert kept_experts(server, NONE_SCALED, first) == kept_experts(server, NONE_SCALED, other) \
        == kept_experts(server, NONE_SCALED, later)
    chat(server, NONE_SCALED, first)
    for messages in (other, later):
        hits = metric(server.url, "vllm:prefix_cache_hits_total")
        answer = chat(server, NONE_SCALED, messages)
        hit = metric(server.url, "vllm:prefix_cache_hits_total") - hits
        prompt = rendered(tokenizer, messages)
        assert answer["choices"][0]["token_ids"] == reference_greedy(
            hf_model, adapters_dir / NONE_SCALED, prompt, MAX_TOKENS)
        assert hit >= KV_BLOCK, hit


def test_a_prompt_turn_one_is_no_prefix_of_is_routed_whole_and_counted(
        server, adapters_dir, hf_model):
    """A prompt cut on the left (truncate_prompt_tokens) no longer starts with turn 1's: the
    router reads all of it, and the fallback is counted."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": QUESTIONS[1]}]
    fallbacks = metric(server.url, "ptmoe_route_scope_fallback_total")
    body = chat(server, FIRST_TURN, messages, truncate_prompt_tokens=100, prompt_logprobs=0)
    prompt = body["prompt_token_ids"]
    assert len(prompt) == 100
    assert served_logprobs(body) == pytest.approx(
        reference_prompt_logprobs(hf_model, adapters_dir / ADAPTER, prompt), abs=2e-3)
    assert metric(server.url, "ptmoe_route_scope_fallback_total") == fallbacks + 1
