"""What the layout promises: settings are plain data, and training routes as serving does."""

import subprocess
import sys

import pytest
import torch

from helpers import random_adapter
from ptmoe_serve.routing.reference import gate_reference
from ptmoe_serve.train.module import PtMoePrompt


def test_config_imports_no_vllm():
    """Building settings (the command line does it first) must not start importing vLLM or
    torch: config.py is the bottom layer."""
    code = ("import sys, ptmoe_serve.config; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("spec", [
    dict(num_experts=4, top_k=1), dict(num_experts=4, top_k=2, router_scaling="none"),
    dict(num_experts=3, top_k=3), dict(num_experts=5, top_k=2)])
def test_the_training_gate_is_the_serving_gate(spec):
    """Without its noise (evaluation mode), the training module weights the experts exactly as
    the serving reference does, ties included."""
    adapter = random_adapter(seed=7, **spec)
    module = PtMoePrompt(adapter).eval()
    prompts = [torch.randn(length, 16) for length in (1, 3, 8)]
    # A tie: equal router rows give equal probabilities; the lower expert index wins.
    module.router_weight.data[1] = module.router_weight.data[0]
    module.router_bias.data[1] = module.router_bias.data[0]
    tied = adapter.__class__(adapter.config, adapter.experts_a, adapter.shared_b,
                             module.router_weight.detach().clone(),
                             module.router_bias.detach().clone())
    means = torch.stack([p.mean(0) for p in prompts])
    with torch.no_grad():
        got = module.expert_weights(means)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(got[row], gate_reference(tied, prompt)[0])
