"""The fused Triton routing kernels equal the plain reference; on a machine without a GPU they
run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import asyncio
import importlib

import pytest
import torch

from helpers import random_adapter
from ptmoe_serve.adapters.bank import AdapterBank, BankShape
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.routing.reference import route_reference
from ptmoe_serve.routing.api_route import ApiRoute
from ptmoe_serve.routing.route import RoutedRequest

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 throughout; the kernels sum in another order than torch: tolerance 1e-5 relative.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("triton")
    return importlib.import_module("ptmoe_serve.routing.kernels")


# (hidden, experts, prompt length, rank): the paper's shape among them
SHAPES = [(48, 1, 5, 4), (48, 3, 5, 4), (576, 2, 40, 36), (80, 5, 7, 20)]
ROUTES = [(1, "probability"), (2, "none"), (1, "none"), (5, "probability")]


@pytest.mark.parametrize("hidden, experts, length, rank", SHAPES)
def test_fused_kernels_equal_the_reference(kernel, hidden, experts, length, rank):
    g = torch.Generator().manual_seed(hidden + experts)
    table = torch.randn(300, hidden, generator=g)
    adapters = [random_adapter(seed=i, hidden_size=hidden, num_experts=experts,
                               prompt_length=length, rank=rank, top_k=min(k, experts),
                               router_scaling=scaling)
                for i, (k, scaling) in enumerate(ROUTES)]
    bank = AdapterBank(BankShape(experts, length, rank), hidden, DEVICE)
    slots = [bank.put(a) for a in adapters]
    owners = [0, 1, 2, 3, 1, 0, 3]
    prompts = [torch.randint(0, 300, (n,), generator=g) for n in (1, 9, 4, 17, 2, 6, 3)]
    offsets = torch.tensor([0, *torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()])
    soft, weights, probabilities = kernel.route_fused(
        table.to(DEVICE), torch.cat(prompts).to(DEVICE), offsets.to(DEVICE),
        torch.tensor([slots[o] for o in owners], device=DEVICE), bank.tensors)
    for row, (owner, ids) in enumerate(zip(owners, prompts)):
        reference = route_reference(adapters[owner], table[ids])
        torch.testing.assert_close(soft[row].cpu(), reference.soft_prompt, **TOLERANCE)
        torch.testing.assert_close(weights[row].cpu(), reference.weights, **TOLERANCE)
        torch.testing.assert_close(probabilities[row].cpu(), reference.probabilities, **TOLERANCE)


def test_ties_pick_the_lower_expert(kernel):
    adapter = random_adapter(seed=1, hidden_size=48, num_experts=3, top_k=2)
    adapter.router_weight.zero_()
    bank = AdapterBank(BankShape(3, 4, 3), 48, DEVICE)
    slot = bank.put(adapter)
    _, weights, _ = kernel.route_fused(
        torch.randn(10, 48, device=DEVICE), torch.tensor([1, 2], device=DEVICE),
        torch.tensor([0, 2], device=DEVICE), torch.tensor([slot], device=DEVICE), bank.tensors)
    expected = route_reference(adapter, torch.randn(2, 48)).weights
    torch.testing.assert_close(weights[0].cpu(), expected, **TOLERANCE)


def test_the_serving_step_gives_the_same_prompts_fused_or_not(kernel):
    table = torch.randn(200, 48)
    registry = AdapterRegistry(48, 128, DEVICE)
    entries = [registry.add("a", random_adapter(seed=1, hidden_size=48), version=1),
               registry.add("b", random_adapter(seed=2, hidden_size=48, num_experts=3,
                                                top_k=3, router_scaling="none"), version=1),
               registry.add("c", random_adapter(seed=3, hidden_size=48), version=1)]
    requests = [(entries[i % 3], list(range(5 * i, 5 * i + 3 + i))) for i in range(7)]

    async def build(fused: bool):
        route = ApiRoute(table, torch.float32, DEVICE, fused=fused)
        # Some prompts routed on their leading tokens only.
        return await asyncio.gather(*(
            route.engine_prompt(RoutedRequest(e, ids, len(ids) - i % 2))
            for i, (e, ids) in enumerate(requests)))

    for plain, fused in zip(asyncio.run(build(False)), asyncio.run(build(True))):
        torch.testing.assert_close(fused["prompt_embeds"], plain["prompt_embeds"], **TOLERANCE)


def test_without_cuda_the_batched_torch_version_is_chosen():
    assert ApiRoute(torch.zeros(4, 16), torch.float32, torch.device("cpu")).fused is False
