"""Adapters for the benchmarks, written to disk in their own formats: PT-MoE format v1 for
this server, PEFT LoRA for vLLM's multi-LoRA peer. Values are random but of the right scale,
so every adapter really changes the computation."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.adapters.format import write_adapter
from ptmoe_serve.adapters.create import init_from_text
from ptmoe_serve.base_model import load_input_embeddings


def write_ptmoe_adapters(folder: Path, model_dir: Path, base_name: str, count: int,
                         prompt_length: int, num_experts: int, rank: int,
                         seed: int = 0, prefix: str = "ptmoe",
                         router_scaling: str = "probability") -> list[Path]:
    """`count` adapters `<prefix><i>`, each initialised from random tokens' embeddings, random
    routers, top-1."""
    table = load_input_embeddings(model_dir)
    config = AdapterConfig.v1(base_name, hidden_size=table.shape[1], num_experts=num_experts,
                              prompt_length=prompt_length, rank=rank, top_k=1,
                              router_scaling=router_scaling)
    g = torch.Generator().manual_seed(seed)
    folders = []
    for i in range(count):
        ids = torch.randint(0, table.shape[0], (prompt_length,), generator=g)
        adapter = init_from_text(table[ids], config)
        adapter.router_weight.normal_(generator=g)
        folders.append(folder / f"{prefix}{i}")
        write_adapter(adapter, folders[-1])
    return folders


def write_lora_adapters(folder: Path, model_dir: Path, count: int, rank: int,
                        target_modules: list[str], seed: int = 0) -> list[Path]:
    """`count` PEFT LoRA adapters: the first saved by `peft` itself, the others its copies
    with fresh random weights. vLLM's filesystem resolver serves an adapter only if its
    `base_model_name_or_path` is the served model's path, which `peft` writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                            target_modules=target_modules,
                                            init_lora_weights=False))
    first = folder / "lora0"
    lora.save_pretrained(first)
    config_path = first / "adapter_config.json"
    weights = load_file(first / "adapter_model.safetensors")
    folders = [first]
    for i in range(1, count):
        folders.append(folder / f"lora{i}")
        folders[-1].mkdir(parents=True, exist_ok=True)
        config_path_i = folders[-1] / "adapter_config.json"
        config_path_i.write_text(config_path.read_text())
        save_file({k: torch.randn_like(v) * v.std() for k, v in weights.items()},
                  folders[-1] / "adapter_model.safetensors")
    return folders


def lora_parameters(folder: Path) -> int:
    return sum(t.numel() for t in load_file(folder / "adapter_model.safetensors").values())
