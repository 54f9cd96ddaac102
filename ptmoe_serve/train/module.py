"""The trainable PT-MoE prompt: experts A [N, T, R], shared B [R, H], a linear router.

Training-time routing as the paper states it: multiplicative Gaussian noise on the logits,
l * (1 + eps) with eps ~ N(0, sigma^2); top-k selection; the kept weight is the expert's
softmax probability (or 1 with scaling "none"), so the router's gradient flows through the
probabilities of the selected experts while the selection itself is a hard choice."""

from __future__ import annotations

import torch
from torch import nn

from ptmoe_serve.adapter import AdapterConfig, PtMoeAdapter


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
        """[B, H] -> [B, N] weights of the experts each prompt uses."""
        logits = mean_embeddings @ self.router_weight.T + self.router_bias
        if self.training and self.noise_std > 0:
            logits = logits * (1 + self.noise_std * torch.randn_like(logits))
        probabilities = torch.softmax(logits, dim=-1)
        # stable descending order: on a tie the lower expert index wins, as when serving
        order = torch.argsort(probabilities.detach(), dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(probabilities).scatter_(-1, order[:, : self.config.top_k], 1.0)
        kept = probabilities if self.config.router_scaling == "probability" \
            else torch.ones_like(probabilities)
        return kept * keep

    def forward(self, mean_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, H] float32 -> soft prompts [B, T, H]."""
        weights = self.expert_weights(mean_embeddings)
        mixed = torch.einsum("bn,ntr->btr", weights, self.experts_a)
        return mixed @ self.shared_b

    def to_adapter(self) -> PtMoeAdapter:
        return PtMoeAdapter(self.config, *(p.detach().float().cpu().contiguous() for p in (
            self.experts_a, self.shared_b, self.router_weight, self.router_bias)))


def config_for(base_name: str, hidden_size: int, num_experts: int, prompt_length: int, rank: int,
               top_k: int, router_scaling: str) -> AdapterConfig:
    return AdapterConfig(peft_type="PT_MOE", format_version=1, base_model_name_or_path=base_name,
                         hidden_size=hidden_size, num_experts=num_experts,
                         prompt_length=prompt_length, rank=rank, top_k=top_k,
                         router_scaling=router_scaling)
