"""Adapter initialisation from a task description, as the PT-MoE paper states it.

The text's token embeddings, repeated or cut to T rows, E = U S V^T; every expert starts as
A_i = U_R S_R^(1/2) and the shared B = S_R^(1/2) V_R^T, so A_i B is E's best rank-R
approximation. The router starts at zero: every expert equally likely."""

from __future__ import annotations

import torch

from ptmoe_serve.adapter import AdapterConfig, PtMoeAdapter


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
