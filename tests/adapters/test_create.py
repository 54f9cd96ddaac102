import pytest
import torch

from helpers import make_config
from ptmoe_serve.adapters.create import fit_to_length, init_from_text
from ptmoe_serve.routing.reference import route_reference


def test_fit_to_length_repeats_or_cuts():
    assert fit_to_length([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert fit_to_length([1, 2, 3], 2) == [1, 2]
    with pytest.raises(ValueError):
        fit_to_length([], 3)


def test_full_rank_init_reproduces_the_text_embeddings():
    text = torch.randn(6, 16)
    adapter = init_from_text(text, make_config(prompt_length=6, rank=6, num_experts=2,
                                               router_scaling="none"))
    for expert in adapter.experts_a:
        torch.testing.assert_close(expert @ adapter.shared_b, text, rtol=1e-4, atol=1e-4)
    routing = route_reference(adapter, torch.randn(3, 16))
    assert routing.probabilities.tolist() == [0.5, 0.5]
    torch.testing.assert_close(routing.soft_prompt, text, rtol=1e-4, atol=1e-4)


def test_low_rank_init_is_the_best_rank_r_approximation():
    text = torch.randn(8, 16)
    adapter = init_from_text(text, make_config(prompt_length=8, rank=3))
    u, s, vh = torch.linalg.svd(text, full_matrices=False)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(adapter.experts_a[0] @ adapter.shared_b, best, rtol=1e-4, atol=1e-4)
    # A and B share the singular values' square roots evenly.
    torch.testing.assert_close(adapter.experts_a[0].norm(dim=0) ** 2, s[:3], rtol=1e-4, atol=1e-4)
