import torch

from helpers import random_adapter
from ptmoe_serve.adapters.bank import AdapterBank, BankShape
from ptmoe_serve.routing.reference import route_batch, route_reference, segment_means
from ptmoe_serve.routing.step import route_slots


def by_hand(adapter, embeddings):
    """The formula as the paper writes it, for top-1 with probability scaling."""
    x = embeddings.mean(0)
    p = torch.softmax(adapter.router_weight @ x + adapter.router_bias, 0)
    best = int(p.argmax())
    return p[best] * adapter.experts_a[best] @ adapter.shared_b, best


def test_reference_top1_probability_matches_the_formula():
    adapter = random_adapter(seed=1, num_experts=4)
    embeddings = torch.randn(7, 16)
    routing = route_reference(adapter, embeddings)
    expected, best = by_hand(adapter, embeddings)
    torch.testing.assert_close(routing.soft_prompt, expected)
    assert routing.weights.nonzero().flatten().tolist() == [best]


def test_reference_dense_without_scaling_sums_all_experts():
    adapter = random_adapter(seed=2, num_experts=3, top_k=3, router_scaling="none")
    routing = route_reference(adapter, torch.randn(5, 16))
    torch.testing.assert_close(routing.soft_prompt, adapter.experts_a.sum(0) @ adapter.shared_b)
    assert routing.weights.tolist() == [1.0, 1.0, 1.0]


def test_reference_top2_keeps_the_two_most_likely_without_renormalising():
    adapter = random_adapter(seed=3, num_experts=4, top_k=2)
    routing = route_reference(adapter, torch.randn(3, 16))
    p = routing.probabilities
    kept = p.argsort(descending=True)[:2]
    expected = torch.zeros(4)
    expected[kept] = p[kept]
    torch.testing.assert_close(routing.weights, expected)
    assert routing.weights.sum() < 1.0


def test_batch_equals_reference_for_heterogeneous_adapters():
    configs = [dict(top_k=1), dict(top_k=2, router_scaling="none"), dict(top_k=3),
               dict(top_k=1, router_scaling="none")]
    adapters = [random_adapter(seed=i, num_experts=3, **c) for i, c in enumerate(configs)]
    bank = AdapterBank(BankShape(3, 4, 3), 16, torch.device("cpu"))
    slots = [bank.put(a) for a in adapters]
    prompts = [torch.randn(length, 16) for length in (1, 5, 9, 2, 5, 3)]
    owners = [0, 1, 2, 3, 1, 0]
    means = torch.stack([p.mean(0) for p in prompts])
    batched = route_slots(bank, torch.tensor([slots[o] for o in owners]), means)
    for row, (prompt, owner) in enumerate(zip(prompts, owners)):
        reference = route_reference(adapters[owner], prompt)
        torch.testing.assert_close(batched.soft_prompt[row], reference.soft_prompt,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.weights[row], reference.weights)


def test_ties_pick_the_lower_expert_in_both_versions():
    adapter = random_adapter(seed=5, num_experts=2, top_k=1)
    adapter.router_weight.zero_()
    adapter.router_bias.zero_()
    reference = route_reference(adapter, torch.randn(2, 16))
    batched = route_batch(adapter.experts_a[None], adapter.shared_b[None],
                          adapter.router_weight[None], adapter.router_bias[None],
                          torch.tensor([1]), torch.tensor([True]), torch.randn(1, 16))
    assert reference.weights.tolist() == [0.5, 0.0]
    assert batched.weights[0].tolist() == [0.5, 0.0]


def test_segment_means():
    rows = torch.arange(12.0).reshape(6, 2)
    means = segment_means(rows, torch.tensor([1, 3, 2]))
    torch.testing.assert_close(means, torch.stack([rows[:1].mean(0), rows[1:4].mean(0),
                                                   rows[4:].mean(0)]))
