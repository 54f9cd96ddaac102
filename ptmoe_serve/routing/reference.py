"""The PT-MoE routing math: from a prompt's mean token embedding to its soft prompt.

`route_reference` is the plain one-request version, written to be read; `route_batch` does the
same for a batch of requests over different adapters of one shape in a few batched tensor ops.
Tests hold the two equal. Everything is computed in float32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptmoe_serve.adapters.format import PtMoeAdapter


@dataclass(frozen=True)
class Routing:
    soft_prompt: torch.Tensor  # [T, H] (or [B, T, H] from route_batch)
    weights: torch.Tensor  # [N]: the kept experts' weights, zero elsewhere
    probabilities: torch.Tensor  # [N]: the router's softmax


def route_reference(adapter: PtMoeAdapter, token_embeddings: torch.Tensor) -> Routing:
    """One prompt: x = mean embedding, p = softmax(Wx + b), keep top-k, P = (sum w_i A_i) B."""
    weights, probabilities = gate_reference(adapter, token_embeddings)
    mixed_a = sum(weights[i] * adapter.experts_a[i] for i in range(adapter.config.num_experts))
    return Routing(mixed_a @ adapter.shared_b, weights, probabilities)


def gate_reference(adapter: PtMoeAdapter, token_embeddings: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's expert weights and router probabilities (reads the router only)."""
    probabilities = _router_probabilities(adapter, token_embeddings)
    weights = torch.zeros_like(probabilities)
    for i in _top_k(adapter, probabilities):
        weights[i] = probabilities[i] if adapter.config.router_scaling == "probability" else 1.0
    return weights, probabilities


def kept_experts(adapter: PtMoeAdapter, token_embeddings: torch.Tensor) -> list[int]:
    """The experts the router keeps for these token embeddings, in index order: under
    `router_scaling: "none"` they alone fix the soft prompt, (sum of their A_i) B."""
    return sorted(_top_k(adapter, _router_probabilities(adapter, token_embeddings)))


def _router_probabilities(adapter: PtMoeAdapter, token_embeddings: torch.Tensor
                          ) -> torch.Tensor:
    x = token_embeddings.to(torch.float32).mean(dim=0)
    return torch.softmax(adapter.router_weight @ x + adapter.router_bias, dim=0)


def _top_k(adapter: PtMoeAdapter, probabilities: torch.Tensor) -> list[int]:
    # Highest probability first; on a tie the lower expert index wins.
    ranked = sorted(range(adapter.config.num_experts), key=lambda i: -probabilities[i].item())
    return ranked[: adapter.config.top_k]


def expert_weights(
    logits: torch.Tensor, top_k: torch.Tensor, scale_by_probability: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched top-k gating with a k and a scaling per row. Returns (weights, probabilities)."""
    probabilities = torch.softmax(logits, dim=-1)
    order = torch.argsort(probabilities, dim=-1, descending=True, stable=True)
    positions = torch.arange(logits.shape[-1], device=logits.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    keep = rank < top_k.unsqueeze(-1)
    kept = torch.where(scale_by_probability.unsqueeze(-1), probabilities, torch.ones_like(probabilities))
    return kept * keep, probabilities


def route_batch(
    experts_a: torch.Tensor,  # [B, N, T, R]
    shared_b: torch.Tensor,  # [B, R, H]
    router_weight: torch.Tensor,  # [B, N, H]
    router_bias: torch.Tensor,  # [B, N]
    top_k: torch.Tensor,  # [B] int
    scale_by_probability: torch.Tensor,  # [B] bool
    mean_embeddings: torch.Tensor,  # [B, H] float32
) -> Routing:
    """Each row of the batch may use a different adapter (the tensors are gathered per row)."""
    logits = torch.einsum("bnh,bh->bn", router_weight, mean_embeddings) + router_bias
    weights, probabilities = expert_weights(logits, top_k, scale_by_probability)
    return Routing(mix_experts(weights, experts_a, shared_b), weights, probabilities)


def mix_experts(weights: torch.Tensor, experts_a: torch.Tensor, shared_b: torch.Tensor
                ) -> torch.Tensor:
    """(sum_i w_i A_i) B for each row: weights [B, N], experts_a [B, N, T, R], shared_b
    [B, R, H] -> [B, T, H]."""
    return torch.bmm(torch.einsum("bn,bntr->btr", weights, experts_a), shared_b)


def segment_means(embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each consecutive run of rows: embeddings [sum(lengths), H] -> [len(lengths), H]."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=embeddings.device), lengths)
    sums = torch.zeros(len(lengths), embeddings.shape[-1], dtype=torch.float32, device=embeddings.device)
    sums.index_add_(0, segment, embeddings.to(torch.float32))
    return sums / lengths.to(torch.float32).unsqueeze(-1)
