"""New adapters: initialised from a task description, as the PT-MoE paper states it, or
imported from a Hugging Face PEFT prompt-tuning checkpoint.

From a description: the text's token embeddings, repeated or cut to T rows, E = U S V^T;
every expert starts as A_i = U_R S_R^(1/2) and the shared B = S_R^(1/2) V_R^T, so A_i B is E's
best rank-R approximation. The router starts at zero: every expert equally likely.

From PEFT: PROMPT_TUNING saves one tensor, `prompt_embeddings` [T, H]. As PT-MoE it is one
expert whose A B is that matrix: the SVD E = U S V^T gives A = U S^(1/2) [T, R] and
B = S^(1/2) V^T [R, H] with R = T (computed in float64, so A B equals E to float32 rounding),
and a router that always picks the one expert with weight 1."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ptmoe_serve.adapters.config import AdapterConfig, AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, PtMoeAdapter

PEFT_TENSOR = "prompt_embeddings"


def fit_to_length(token_ids: list[int], length: int) -> list[int]:
    """Repeat the text's tokens cyclically, or cut them, to exactly `length` tokens."""
    if not token_ids:
        raise ValueError("the task description has no tokens")
    return [token_ids[i % len(token_ids)] for i in range(length)]


def init_from_text(text_embeddings: torch.Tensor, config: AdapterConfig) -> PtMoeAdapter:
    """`text_embeddings` [T, H] are the embeddings of the description fitted to T tokens."""
    t, h = text_embeddings.shape
    if (t, h) != (config.prompt_length, config.hidden_size):
        raise ValueError(f"text embeddings are {[t, h]}; the config needs "
                         f"{[config.prompt_length, config.hidden_size]}")
    if config.rank > min(t, h):
        raise ValueError(f"rank {config.rank} exceeds min(prompt_length, hidden_size) = {min(t, h)}")
    u, s, vh = torch.linalg.svd(text_embeddings.to(torch.float32), full_matrices=False)
    root = s[: config.rank].sqrt()
    expert = u[:, : config.rank] * root
    return PtMoeAdapter(
        config=config,
        experts_a=expert.expand(config.num_experts, -1, -1).clone(),
        shared_b=root[:, None] * vh[: config.rank],
        router_weight=torch.zeros(config.num_experts, h),
        router_bias=torch.zeros(config.num_experts),
    )


def convert_prompt_tuning(source: Path) -> PtMoeAdapter:
    config_path, weights_path = source / CONFIG_FILE, source / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{source} has no {CONFIG_FILE}")
    peft_config = json.loads(config_path.read_text())
    if peft_config.get("peft_type") != "PROMPT_TUNING":
        raise AdapterError(f"{source} is a {peft_config.get('peft_type')} checkpoint; only "
                           "PROMPT_TUNING can be converted")
    if not weights_path.is_file():
        pickles = [p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise AdapterError(f"{source} has no {WEIGHTS_FILE}"
                           + (f" ({pickles} are pickle-based and never loaded; re-save the "
                              "checkpoint with safe_serialization=True)" if pickles else ""))
    weights = load_file(weights_path)
    if set(weights) != {PEFT_TENSOR}:
        raise AdapterError(f"{WEIGHTS_FILE} must hold exactly '{PEFT_TENSOR}', found "
                           f"{sorted(weights)}")
    embeddings = weights[PEFT_TENSOR].to(torch.float64)
    t, h = embeddings.shape
    if t > h:
        raise AdapterError(f"{PEFT_TENSOR} is [{t}, {h}]: more virtual tokens than hidden size")
    if not torch.isfinite(embeddings).all():
        raise AdapterError(f"{PEFT_TENSOR} holds NaN or Inf values")
    u, s, vh = torch.linalg.svd(embeddings, full_matrices=False)
    root = s.sqrt()
    config = AdapterConfig.v1(peft_config.get("base_model_name_or_path") or "", hidden_size=h,
                              num_experts=1, prompt_length=t, rank=t, top_k=1,
                              router_scaling="none")
    return PtMoeAdapter(
        config=config,
        experts_a=(u * root).unsqueeze(0).to(torch.float32).contiguous(),
        shared_b=(root[:, None] * vh).to(torch.float32).contiguous(),
        router_weight=torch.zeros(1, h),
        router_bias=torch.zeros(1),
    )
