"""Choosing the route of the routing step: in the engine where the model's architecture allows,
through prompt embeddings elsewhere, without the user doing anything. (That both routes answer
exactly as transformers does is tests/test_e2e_greedy.py's.)"""

import json

import pytest

from ptmoe_serve.cli import _routing_in_engine
from ptmoe_serve.engine.vllm_model import supports


@pytest.fixture
def other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    return tmp_path


def test_the_default_model_routes_in_the_engine(model_dir):
    assert supports(model_dir)
    assert _routing_in_engine("auto", model_dir) is True
    assert _routing_in_engine("api", model_dir) is False


def test_other_architectures_fall_back_to_prompt_embeddings(other_architecture):
    assert not supports(other_architecture)
    assert _routing_in_engine("auto", other_architecture) is False
    with pytest.raises(SystemExit, match="not one the in-engine route wraps"):
        _routing_in_engine("engine", other_architecture)


def test_the_workers_step_routes_every_request_by_its_key():
    """What a worker computes for one step: mixed adapters and shapes, both versions of the
    step (batched torch; fused kernels, here under Triton's interpreter), and vLLM's profiling
    key, which routes to zeros."""
    import torch

    from helpers import random_adapter
    from ptmoe_serve.adapters.bank import BankShape
    from ptmoe_serve.adapters.registry import AdapterRegistry
    from ptmoe_serve.engine.vllm_model import AdapterRef, route_keys
    from ptmoe_serve.routing.reference import kept_experts, route_reference

    vocab, hidden = 40, 16
    table = torch.randn(vocab, hidden)
    registry = AdapterRegistry(hidden, 256, torch.device("cpu"))
    entries = [registry.add("a", random_adapter(seed=1), version=1),
               registry.add("b", random_adapter(seed=2, num_experts=3, top_k=2), version=1),
               registry.add("c", random_adapter(seed=3, prompt_length=7, rank=5,
                                                router_scaling="none"), version=1),
               registry.add("d", random_adapter(seed=4, num_experts=1, top_k=1), version=1)]
    banks = {e.bank.shape: e.bank for e in entries}
    g = torch.Generator().manual_seed(0)
    requests = [(entries[i % 4], torch.randint(0, vocab, (1 + 3 * i,), generator=g))
                for i in range(9)]
    # Each request's key as the input processor turns it into the worker's row.
    keys = [AdapterRef.from_key(AdapterRef(e.bank.shape, e.slot, e.name, 1).to_key(3)).row()
            for e, _ in requests]
    prompts = [ids for _, ids in requests]
    expected = [route_reference(e.adapter, table[ids]).soft_prompt for e, ids in requests]

    def embed(ids):
        return table[ids]

    for fused_table in (None, table):
        got = route_keys(banks, keys, prompts, hidden, embed, fused_table)
        for g_, e in zip(got, expected):
            torch.testing.assert_close(g_, e, rtol=1e-5, atol=1e-5)  # float32
        # In the model's dtype: computed in float32, rounded once (bfloat16's tolerance).
        got = route_keys(banks, keys, prompts, hidden, embed, fused_table, torch.bfloat16)
        for g_, e in zip(got, expected):
            assert g_.dtype == torch.bfloat16
            torch.testing.assert_close(g_, e.to(torch.bfloat16))
    # The "none"-scaled and the one-expert adapters' requests keyed by the experts their
    # router keeps, as the API process names them: mixed without routing, the same soft prompts.
    experts = [kept_experts(e.adapter, table[ids]) if e.name in ("c", "d") else [-1]
               for e, ids in requests]
    assert [x for x in experts if x != [-1]]
    for fused_table in (None, table):
        got = route_keys(banks, keys, prompts, hidden, embed, fused_table, experts=experts)
        for g_, e in zip(got, expected):
            torch.testing.assert_close(g_, e, rtol=1e-5, atol=1e-5)
    profile = route_keys(banks, [[1, 9, 1, -1]], [torch.tensor([0])], hidden, embed)
    assert torch.equal(profile[0], torch.zeros(9, hidden))
    assert BankShape(1, 9, 1) not in banks


def test_adapters_reach_the_workers_banks_in_batches_of_mixed_shapes(tmp_path):
    """What crosses to the workers (`pack_adapters`, as bytes or a file) rebuilds banks there
    that route as the server's own: slots, sizes and every field of each adapter."""
    import safetensors.torch
    import torch

    from helpers import random_adapter
    from ptmoe_serve.adapters.bank import AdapterBank
    from ptmoe_serve.adapters.registry import AdapterRegistry
    from ptmoe_serve.engine.vllm_model import pack_adapters, read_packed, unpack_adapters
    from ptmoe_serve.routing.step import route_slots

    registry = AdapterRegistry(16, 256, torch.device("cpu"))
    entries = [registry.add(f"a{i}", random_adapter(
        seed=i, num_experts=2 + i % 2, top_k=1 + i % 2, prompt_length=4 + i % 2,
        router_scaling=("probability", "none")[i % 3 == 0]), version=1) for i in range(11)]
    workers: dict = {}
    for batch, transport in ((entries[6:], "bytes"), (entries[:6], "file")):
        banks, tensors = pack_adapters(batch)
        if transport == "bytes":  # where workers run on other machines
            packed = safetensors.torch.save(tensors)
        else:  # a file in shared memory, where they share this one
            packed = str(tmp_path / "packed.safetensors")
            safetensors.torch.save_file(tensors, packed)
        for shape, slots, rows, capacity in unpack_adapters(banks, read_packed(packed)):
            bank = workers.setdefault(shape, AdapterBank(shape, 16, torch.device("cpu")))
            bank.write_rows(slots, rows, capacity)
    assert len(workers) == 2
    x = torch.randn(16)
    for entry in entries:
        bank = workers[entry.bank.shape]
        assert bank.capacity == entry.bank.capacity
        slot = torch.tensor([entry.slot])
        got, want = route_slots(bank, slot, x[None]), route_slots(entry.bank, slot, x[None])
        torch.testing.assert_close(got.soft_prompt, want.soft_prompt)
        torch.testing.assert_close(got.weights, want.weights)
