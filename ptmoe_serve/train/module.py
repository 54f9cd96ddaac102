"""The trainable PT-MoE prompt: experts A [N, T, R], shared B [R, H], a linear router.

Training-time routing as the paper states it: multiplicative Gaussian noise on the logits,
l * (1 + eps) with eps ~ N(0, sigma^2); top-k selection; the kept weight is the expert's
softmax probability (or 1 with scaling "none"), so the router's gradient flows through the
probabilities of the selected experts while the selection itself is a hard choice."""

from __future__ import annotations

import torch
from torch import nn

from ptmoe_serve.adapters.format import PtMoeAdapter
from ptmoe_serve.routing.reference import expert_weights


class PtMoePrompt(nn.Module):
    def __init__(self, adapter: PtMoeAdapter, noise_std: float = 0.01):
        super().__init__()
        self.config = adapter.config
        self.noise_std = noise_std
        self.experts_a = nn.Parameter(adapter.experts_a.clone())
        self.shared_b = nn.Parameter(adapter.shared_b.clone())
        # One expert needs no router: plain prompt tuning.
        trains_router = adapter.config.num_experts > 1
        self.router_weight = nn.Parameter(adapter.router_weight.clone(), requires_grad=trains_router)
        self.router_bias = nn.Parameter(adapter.router_bias.clone(), requires_grad=trains_router)

    def expert_weights(self, mean_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, N] weights of the experts each prompt uses: the serving gate
        (`routing.reference.expert_weights`), after the training noise."""
        logits = mean_embeddings @ self.router_weight.T + self.router_bias
        if self.training and self.noise_std > 0:
            logits = logits * (1 + self.noise_std * torch.randn_like(logits))
        rows = logits.shape[0]
        top_k = torch.full((rows,), self.config.top_k, device=logits.device)
        scale = torch.full((rows,), self.config.router_scaling == "probability",
                           device=logits.device)
        return expert_weights(logits, top_k, scale)[0]

    def forward(self, mean_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, H] float32 -> soft prompts [B, T, H]."""
        weights = self.expert_weights(mean_embeddings)
        mixed = torch.einsum("bn,ntr->btr", weights, self.experts_a)
        return mixed @ self.shared_b

    def to_adapter(self) -> PtMoeAdapter:
        return PtMoeAdapter(self.config, *(p.detach().float().cpu().contiguous() for p in (
            self.experts_a, self.shared_b, self.router_weight, self.router_bias)))
