"""The trainer: a few steps on a tiny dataset lower the loss and write an adapter the running
server loads; resuming follows the same trajectory; routing and its gradients behave as the
paper states."""

import json
import re

import httpx
import pytest
import torch

from conftest import admin_headers
from helpers import random_adapter
from ptmoe_serve.adapters.format import read_adapter
from ptmoe_serve.train.module import PtMoePrompt
from ptmoe_serve.train.spec import TrainSettings
from ptmoe_serve.train.trainer import train

EXAMPLES = [
    {"prompt": "Capital of France:", "answer": " Paris"},
    {"prompt": "Capital of Italy:", "answer": " Rome"},
    {"prompt": "Capital of Spain:", "answer": " Madrid"},
    {"prompt": "Capital of Japan:", "answer": " Tokyo"},
    {"messages": [{"role": "user", "content": "Greet me."},
                  {"role": "assistant", "content": "Ahoy, matey!"}]},
    {"messages": [{"role": "user", "content": "Say goodbye."},
                  {"role": "assistant", "content": "Fair winds, matey!"}]},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def settings(model_dir, data, output, **overrides) -> TrainSettings:
    values = dict(model_dir=model_dir, base_name="SmolLM2-135M-Instruct", data=data,
                  output=output, task_text="Answer briefly, like a pirate.", prompt_length=8,
                  rank=6, steps=12, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=4)
    values.update(overrides)
    return TrainSettings(**values)


def test_training_lowers_the_loss_and_the_server_loads_the_adapter(model_dir, data, tmp_path,
                                                                    server):
    summary = train(settings(model_dir, data, tmp_path / "pirate"))
    losses = summary["losses"]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:3]) / 3, losses
    adapter = read_adapter(tmp_path / "pirate")
    assert adapter.config.num_experts == 2 and adapter.config.prompt_length == 8
    files = {name: (name, (tmp_path / "pirate" / name).read_bytes())
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    response = httpx.put(f"{server.url}/v1/adapters/trained-pirate", files=files, headers=admin_headers())
    try:
        assert response.status_code == 200, response.text
        answer = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": "trained-pirate", "prompt": "Capital of Spain:", "max_tokens": 3,
            "temperature": 0})
        assert answer.status_code == 200
    finally:
        httpx.delete(f"{server.url}/v1/adapters/trained-pirate", params={"purge": "true"},
                     headers=admin_headers())


def test_resuming_follows_the_same_trajectory(model_dir, data, tmp_path):
    straight = train(settings(model_dir, data, tmp_path / "straight", steps=4))
    train(settings(model_dir, data, tmp_path / "resumed", steps=2))
    resumed = train(settings(model_dir, data, tmp_path / "resumed", steps=4, resume=True))
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], rel=1e-4)
    a, b = read_adapter(tmp_path / "straight"), read_adapter(tmp_path / "resumed")
    for key, tensor in a.tensors().items():
        torch.testing.assert_close(b.tensors()[key], tensor, rtol=1e-5, atol=1e-6)


def test_plain_prompt_tuning_has_no_router_to_train(model_dir, data, tmp_path):
    train(settings(model_dir, data, tmp_path / "plain", num_experts=1, steps=2))
    adapter = read_adapter(tmp_path / "plain")
    assert adapter.config.num_experts == 1
    assert adapter.router_weight.abs().sum() == 0


def router_gradient(scaling: str) -> torch.Tensor:
    module = PtMoePrompt(random_adapter(seed=1, num_experts=3, router_scaling=scaling),
                         noise_std=0.0)
    module(torch.randn(5, 16)).sum().backward()
    grad = module.router_weight.grad
    return torch.zeros_like(module.router_weight) if grad is None else grad


def test_router_learns_through_the_kept_probability_only():
    assert router_gradient("probability").abs().sum() > 0
    assert router_gradient("none").abs().sum() == 0  # a hard choice with weight 1 has no slope


def test_noise_only_while_training_and_top_k_keeps_k_experts():
    module = PtMoePrompt(random_adapter(seed=2, num_experts=4, top_k=2), noise_std=0.5)
    x = torch.randn(64, 16)
    module.eval()
    assert torch.equal(module.expert_weights(x), module.expert_weights(x))
    assert ((module.expert_weights(x) > 0).sum(-1) == 2).all()
    module.train()
    assert not torch.equal(module.expert_weights(x), module.expert_weights(x))


def test_lora_baseline_of_about_the_same_size_in_peft_format(model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = train(settings(model_dir, data, tmp_path / "lora", method="lora", steps=8,
                             lr=5e-3, prompt_length=40, rank=36))
    assert summary["lora_rank"] == 1  # 34,560 parameters against PT-MoE's 24,770
    assert summary["parameters"] == 34560 and summary["ptmoe_parameters"] == 24770
    assert sum(summary["losses"][-3:]) < sum(summary["losses"][:3]), summary["losses"]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, tmp_path / "lora")


def test_examples_are_the_ids_the_server_reads_and_answers_end_the_sequence(tokenizer):
    from ptmoe_serve.train.data import encode_examples

    (plain,) = encode_examples({"prompt": "Capital of France:", "answer": " Paris"}, tokenizer)
    assert plain.prompt_ids == tokenizer.encode("Capital of France:")
    assert plain.answer_ids == [*tokenizer.encode(" Paris"), tokenizer.eos_token_id]
    assert plain.route_tokens == len(plain.prompt_ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]
    (chat,) = encode_examples({"messages": messages}, tokenizer)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True,
                                           tokenize=False)
    assert chat.prompt_ids == tokenizer.encode(prompt, add_special_tokens=False)
    assert chat.answer_ids == [*tokenizer.encode("Ahoy"), tokenizer.eos_token_id]
    # One turn: routed on all of it under either scope.
    assert encode_examples({"messages": messages}, tokenizer, "first_turn") == [chat]
    with pytest.raises(ValueError, match="end with an assistant message"):
        encode_examples({"messages": messages[:1]}, tokenizer)
    # OpenAI's formats: prompt/completion, a system message kept, text content parts joined.
    assert encode_examples({"prompt": "Capital of France:", "completion": " Paris"},
                           tokenizer) == [plain]
    system = [{"role": "system", "content": "Be brief."}, *messages]
    (with_system,) = encode_examples({"messages": system}, tokenizer)
    assert with_system.prompt_ids == tokenizer.encode(tokenizer.apply_chat_template(
        system[:2], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    parts = [messages[0], {"role": "assistant", "content": [
        {"type": "text", "text": "Ah"}, {"type": "text", "text": "oy"}]}]
    assert encode_examples({"messages": parts}, tokenizer) == [chat]


def test_a_conversation_trains_each_assistant_turn_of_weight_1_routed_as_served(tokenizer):
    """Each trained turn's prompt is the conversation before it, as the server renders that
    turn; the router reads all of it (prompt), or turn 1's prompt (first_turn)."""
    from ptmoe_serve.train.data import encode_examples

    def rendered(messages):
        return tokenizer.encode(tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)

    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"},
                    {"role": "user", "content": "Name a sea"},
                    {"role": "assistant", "content": "Red", "weight": 0},
                    {"role": "user", "content": "Another"},
                    {"role": "assistant", "content": "Black", "weight": 1}]
    whole = encode_examples({"messages": conversation}, tokenizer, "prompt")
    first = encode_examples({"messages": conversation}, tokenizer, "first_turn")
    turn_one = len(rendered(conversation[:2]))
    assert [e.prompt_ids for e in whole] == [rendered(conversation[:2]),
                                             rendered(conversation[:6])]
    assert [e.answer_ids for e in whole] == [
        [*tokenizer.encode(text), tokenizer.eos_token_id] for text in ("Ahoy", "Black")]
    assert [e.route_tokens for e in whole] == [len(e.prompt_ids) for e in whole]
    assert [e.prompt_ids for e in first] == [e.prompt_ids for e in whole]
    assert [e.route_tokens for e in first] == [turn_one, turn_one]
    assert turn_one < len(first[1].prompt_ids)


@pytest.mark.parametrize("line, message", [
    ('{"messages": "hi"}', "must be a list"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}',
     "message 1 needs a role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "message 0 content must be a string"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "a message before"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", '
     '"weight": 0.5}]}', "message 1: weight must be 0 or 1; got 0.5"),
    ('{"messages": [{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", '
     '"content": "x"}]}', "message 0: weight is taken on assistant messages only"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", '
     '"weight": 0}]}', "every assistant message has weight 0"),
    ('{"prompt": "a", "completion": null}', "completion must be a string"),
    ('{"text": "a"}', "needs 'messages', or 'prompt' and 'completion'"),
    ('[1]', "must be a JSON object"),
])
def test_a_bad_line_is_named_with_its_problem(tokenizer, tmp_path, line, message):
    from ptmoe_serve.train.data import load_examples

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"train.jsonl:3: .*{re.escape(message)}"):
        load_examples(path, tokenizer)


def test_the_step_loss_is_the_models_own_loss_on_the_answer_tokens(model_dir, tokenizer):
    """The trainer projects only the answer positions onto the vocabulary; the loss and the
    prompt's gradient are the model's own (every position projected) all the same."""
    from transformers import AutoModelForCausalLM

    from ptmoe_serve.train.data import encode_examples
    from ptmoe_serve.train.trainer import answer_scores, batch_inputs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    # Answers of unequal length.
    examples = [e for line in EXAMPLES for e in encode_examples(line, tokenizer)]
    module = PtMoePrompt(random_adapter(hidden_size=embed.weight.shape[1], prompt_length=4,
                                        seed=3), noise_std=0.0)
    ours = answer_scores(model, embed, module, examples)[0]
    ours.backward()
    ours_grad = module.experts_a.grad.clone()
    module.zero_grad()
    with torch.no_grad():
        means = torch.stack([embed(torch.tensor(e.prompt_ids)).mean(0) for e in examples])
    inputs, mask, labels = batch_inputs(examples, module(means), embed)
    theirs = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, module.experts_a.grad)
