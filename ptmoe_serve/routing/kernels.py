"""The routing step as two Triton kernels that read the adapter bank in place.

`route_batch` (reference.py) gathers each request's bank rows into new tensors before its batched
products; at large hidden sizes that copy of `shared.B` costs more than the math. Here:

1. `_gate_kernel`, one program per request: the mean of the prompt's token embeddings, the
   router logits, softmax, top-k by rank and the scaling -> expert weights [B, N];
2. `_prompt_kernel`, one program per (request, block of H columns): the mixture
   sum_i w_i A_i [T, R], times the block of the request's own `shared.B` rows -> P [B, T, H].

Both take slot indices into the bank, so adapters may differ request by request. Tests hold
them equal to the reference, on CUDA and, without a GPU, under TRITON_INTERPRET=1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_kernel(table, token_ids, offsets, slots, router_w, router_b, top_k, scale_prob,
                 weights_out, probs_out, H: tl.constexpr, N: tl.constexpr,
                 N_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(offsets + b)
    end = tl.load(offsets + b + 1)
    slot = tl.load(slots + b).to(tl.int64)
    experts = tl.arange(0, N_PAD)
    expert_ok = experts < N
    logits = tl.zeros([N_PAD], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        x = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(start, end):
            token = tl.load(token_ids + i).to(tl.int64)
            x += tl.load(table + token * H + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = x / (end - start).to(tl.float32)
        w = tl.load(router_w + slot * N * H + experts[:, None] * H + cols[None, :],
                    mask=expert_ok[:, None] & col_ok[None, :], other=0.0)
        logits += tl.sum(w * x[None, :], axis=1)
    logits += tl.load(router_b + slot * N + experts, mask=expert_ok, other=0.0)
    logits = tl.where(expert_ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    # rank of expert i: experts with a higher probability, or equal and a lower index
    above = (p[None, :] > p[:, None]) | ((p[None, :] == p[:, None])
                                         & (experts[None, :] < experts[:, None]))
    rank = tl.sum(tl.where(above & expert_ok[None, :], 1, 0), axis=1)
    keep = (rank < tl.load(top_k + slot)) & expert_ok
    kept = tl.where(tl.load(scale_prob + slot) != 0, p, 1.0)
    tl.store(weights_out + b * N + experts, tl.where(keep, kept, 0.0), mask=expert_ok)
    tl.store(probs_out + b * N + experts, p, mask=expert_ok)


@triton.jit
def _prompt_kernel(weights, slots, experts_a, shared_b, out, H: tl.constexpr, N: tl.constexpr,
                   T: tl.constexpr, R: tl.constexpr, T_PAD: tl.constexpr, R_PAD: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    slot = tl.load(slots + b).to(tl.int64)
    rows = tl.arange(0, T_PAD)
    ranks = tl.arange(0, R_PAD)
    a_mask = (rows[:, None] < T) & (ranks[None, :] < R)
    mixed = tl.zeros([T_PAD, R_PAD], dtype=tl.float32)
    for n in range(N):
        w = tl.load(weights + b * N + n)
        a = tl.load(experts_a + ((slot * N + n) * T + rows[:, None]) * R + ranks[None, :],
                    mask=a_mask, other=0.0)
        mixed += w * a
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    b_rows = tl.load(shared_b + (slot * R + ranks[:, None]) * H + cols[None, :],
                     mask=(ranks[:, None] < R) & (cols[None, :] < H), other=0.0)
    prompt = tl.dot(mixed, b_rows, input_precision="ieee")
    tl.store(out + (b * T + rows[:, None]) * H + cols[None, :],
             prompt.to(out.dtype.element_ty),
             mask=(rows[:, None] < T) & (cols[None, :] < H))


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def route_fused(table: torch.Tensor, token_ids: torch.Tensor, offsets: torch.Tensor,
                slots: torch.Tensor, bank: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft prompts [B, T, H] in `dtype` (computed in float32, rounded once on the store),
    expert weights [B, N] and probabilities [B, N] for requests whose tokens are
    `token_ids[offsets[b]:offsets[b + 1]]`, each routed by the bank row `slots[b]`. `bank`
    holds the tensors of one AdapterBank."""
    batch = slots.shape[0]
    _, n, t, r = bank["experts_a"].shape
    h = table.shape[1]
    weights = torch.empty(batch, n, dtype=torch.float32, device=slots.device)
    probabilities = torch.empty_like(weights)
    block_h = min(1024, triton.next_power_of_2(h))
    _gate_kernel[(batch,)](table, token_ids, offsets, slots, bank["router_weight"],
                           bank["router_bias"], bank["top_k"], bank["scale_by_probability"],
                           weights, probabilities, H=h, N=n, N_PAD=_pad(n), BLOCK_H=block_h)
    prompts = torch.empty(batch, t, h, dtype=dtype, device=slots.device)
    block = 64
    _prompt_kernel[(batch, triton.cdiv(h, block))](
        weights, slots, bank["experts_a"], bank["shared_b"], prompts, H=h, N=n, T=t, R=r,
        T_PAD=_pad(t), R_PAD=_pad(r), BLOCK_H=block)
    return prompts, weights, probabilities
