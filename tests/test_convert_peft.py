"""A prompt-tuning checkpoint saved by the real `peft` library, converted and served: the
server's greedy output equals PEFT's own generation."""

import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

from conftest import admin_headers
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import read_adapter, write_adapter
from ptmoe_serve.adapters.create import convert_prompt_tuning
from ptmoe_serve.routing.reference import route_reference

QUESTIONS = ["What is the capital of Germany?", "Name three fruits."]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def peft_model(model_dir, tmp_path_factory):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=12,
                                prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text="Answer like a pirate, arr matey!",
                                tokenizer_name_or_path=str(model_dir))
    model = get_peft_model(base, config).eval()
    folder = tmp_path_factory.mktemp("peft") / "pirate"
    model.save_pretrained(folder)
    return model, folder


def test_conversion_reproduces_the_prompt(peft_model, tmp_path):
    model, folder = peft_model
    adapter = convert_prompt_tuning(folder)
    assert adapter.config.num_experts == 1 and adapter.config.rank == 12
    write_adapter(adapter, tmp_path / "converted")
    loaded = read_adapter(tmp_path / "converted")
    prompt = route_reference(loaded, torch.randn(5, 576)).soft_prompt
    expected = model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(prompt, expected, rtol=0, atol=2e-6)


def test_served_greedy_output_equals_peft_generation(peft_model, server, tokenizer, tmp_path):
    model, folder = peft_model
    write_adapter(convert_prompt_tuning(folder), tmp_path / "peft-pirate")
    files = {name: (name, (tmp_path / "peft-pirate" / name).read_bytes())
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert httpx.put(f"{server.url}/v1/adapters/peft-pirate", files=files, headers=admin_headers()).status_code == 200
    try:
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)["input_ids"]
            with torch.inference_mode():
                out = model.generate(input_ids=torch.tensor([ids]),
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=MAX_TOKENS, do_sample=False)
            generated = out[0].tolist()  # PEFT returns the prompt's ids, then the new ones
            expected = generated[len(ids):] if generated[:len(ids)] == ids else generated
            response = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
                "model": "peft-pirate", "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0, "return_token_ids": True})
            assert response.json()["choices"][0]["token_ids"] == expected, question
    finally:
        httpx.delete(f"{server.url}/v1/adapters/peft-pirate", params={"purge": "true"},
                     headers=admin_headers())


def test_other_checkpoints_are_refused(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="only PROMPT_TUNING"):
        convert_prompt_tuning(tmp_path / "lora")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING"}))
    torch.save({"prompt_embeddings": torch.zeros(2, 4)}, tmp_path / "pickled" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle-based"):
        convert_prompt_tuning(tmp_path / "pickled")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING"}))
    save_file({"prompt_embeddings": torch.full((2, 4), float("nan"))},
              tmp_path / "odd" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN"):
        convert_prompt_tuning(tmp_path / "odd")
