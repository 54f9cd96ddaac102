"""The routing step: the soft prompts of a batch of requests, each naming its adapter by bank
and slot. Both routes call it, the api route in the API process and the engine
route's model in vLLM's workers, so the two compute a step the same way.

Per adapter shape, one batched routing over the requests' slots: the fused Triton kernels
(kernels.py) when given the whole embedding table, else one embedding lookup, segment means
and the batched torch version (reference.route_batch). Computed in float32, handed over in the
model's dtype."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from ptmoe_serve.adapters.bank import AdapterBank, BankShape
from ptmoe_serve.routing.reference import Routing, mix_experts, route_batch, segment_means

# For the test suite alone: PTMOE_TEST_ZERO_SOFT_PROMPTS=1 in the environment makes every soft
# prompt zeros in each process that routes (the API process, vLLM's workers), so a run of the
# suite with it shows which tests would pass were the adapters' effect lost (README, "Tests").
# Read once, at import, as the failpoints are (disk.py).
ZERO_SOFT_PROMPTS = os.environ.get("PTMOE_TEST_ZERO_SOFT_PROMPTS") == "1"


def route_step(targets: Sequence[tuple[AdapterBank | None, BankShape, int]],
               prompts: Sequence[torch.Tensor], hidden_size: int,
               embed: Callable[[torch.Tensor], torch.Tensor],
               table: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
               kept: Sequence[list[int] | None] | None = None) -> list[torch.Tensor]:
    """Soft prompts [T, H] in `dtype`, one per target (bank, its shape, slot), in order.
    `prompts` are the token ids each router reads; `embed` looks ids up in the model's
    embedding table, or `table` is that table for the fused kernels. A request whose `kept`
    experts are given is not routed: its soft prompt is (sum of those A_i) B, as its
    adapter's router, under `router_scaling: "none"`, chose them. Each soft prompt is a view
    into its group's one tensor. No bank, or a negative slot (vLLM's profiling run), routes
    to zeros."""
    kept = kept or [None] * len(targets)
    device = prompts[0].device if table is None else table.device
    prompts = [p.to(device) for p in prompts]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    means = None if table is not None else segment_means(embed(torch.cat(prompts)), lengths)
    groups: dict[tuple[int, BankShape, bool], list[int]] = {}
    for i, (bank, shape, _) in enumerate(targets):
        groups.setdefault((id(bank), shape, kept[i] is not None), []).append(i)
    out: list[torch.Tensor] = [None] * len(targets)  # type: ignore[list-item]
    for (_, _, fixed), rows in groups.items():
        bank, shape, _ = targets[rows[0]]
        slots = torch.tensor([targets[i][2] for i in rows], device=device)
        if bank is None or bool(slots[0] < 0) or ZERO_SOFT_PROMPTS:
            soft = torch.zeros(len(rows), shape.prompt_length, hidden_size, dtype=dtype,
                               device=device)
        elif fixed:
            weights = torch.zeros(len(rows), shape.num_experts, device=device)
            for j, i in enumerate(rows):
                weights[j, kept[i]] = 1.0
            soft = mix_experts(weights, bank.tensors["experts_a"].index_select(0, slots),
                               bank.tensors["shared_b"].index_select(0, slots)).to(dtype)
        elif table is not None:
            from ptmoe_serve.routing.kernels import route_fused

            group_ids = torch.cat([prompts[i] for i in rows])
            offsets = torch.nn.functional.pad(lengths[rows].cumsum(0), (1, 0))
            soft = route_fused(table, group_ids, offsets, slots, bank.tensors, dtype)[0]
        else:
            soft = route_slots(bank, slots, means[rows]).soft_prompt.to(dtype)
        for j, i in enumerate(rows):
            out[i] = soft[j]
    return out


def route_slots(bank: AdapterBank, slots: torch.Tensor, mean_embeddings: torch.Tensor
                ) -> Routing:
    """The batched torch version over a bank: each row's adapter by slot."""
    rows = {key: tensor.index_select(0, slots) for key, tensor in bank.tensors.items()}
    return route_batch(mean_embeddings=mean_embeddings, **rows)
