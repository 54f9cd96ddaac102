import asyncio

import torch

from helpers import random_adapter
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.routing.reference import route_reference
from ptmoe_serve.base_model import load_input_embeddings
from ptmoe_serve.routing.api_route import ApiRoute
from ptmoe_serve.routing.route import RoutedRequest

VOCAB, HIDDEN = 50, 16
CPU = torch.device("cpu")


def routed(entry, ids, route_tokens=None) -> RoutedRequest:
    return RoutedRequest(entry, ids, route_tokens or len(ids))


async def embeds(route, request: RoutedRequest) -> torch.Tensor:
    return (await route.engine_prompt(request))["prompt_embeds"]


def build_all(route_args, requests):
    """Submit all requests at once; return the results and the sizes of the steps taken."""
    steps = []

    async def run():
        route = ApiRoute(*route_args, on_step=lambda n, s: steps.append(n))
        return await asyncio.gather(*(embeds(route, routed(e, ids)) for e, ids in requests))

    return asyncio.run(run()), steps


def test_requests_arriving_together_share_one_step_and_match_the_reference():
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    adapters = {
        "top1": random_adapter(seed=1),
        "dense": random_adapter(seed=2, num_experts=3, top_k=3, router_scaling="none"),
        "long": random_adapter(seed=3, prompt_length=9, rank=5, top_k=2),
    }
    entries = {name: reg.add(name, a, version=1) for name, a in adapters.items()}
    g = torch.Generator().manual_seed(0)
    requests = [(entries[name], torch.randint(0, VOCAB, (length,), generator=g).tolist())
                for name, length in [("top1", 3), ("dense", 7), ("long", 1), ("top1", 12),
                                     ("long", 5), ("dense", 2)]]
    results, steps = build_all((table, torch.float32, CPU), requests)
    assert steps == [len(requests)]
    for (entry, ids), result in zip(requests, results):
        tokens = table[torch.tensor(ids)]
        reference = route_reference(adapters[entry.name], tokens)
        t = entry.adapter.config.prompt_length
        assert result.shape == (t + len(ids), HIDDEN)
        torch.testing.assert_close(result[:t], reference.soft_prompt, rtol=1e-5, atol=1e-5)
        assert torch.equal(result[t:], tokens)


def test_the_router_reads_only_the_routed_tokens_and_routing_shows_its_weights():
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    adapter = random_adapter(seed=4, num_experts=3, top_k=2)
    entry = reg.add("a", adapter, version=1)
    question, options = [3, 9, 4, 1], [[7, 7, 2], [11]]

    async def run():
        route = ApiRoute(table, torch.float32, CPU)
        built = await asyncio.gather(*(embeds(route, routed(entry, question + o, len(question)))
                                       for o in options))
        return built, route.routing(entry, question)

    built, routing = asyncio.run(run())
    weights, probabilities = routing.expert_weights, routing.expert_probabilities
    reference = route_reference(adapter, table[torch.tensor(question)])
    for result, option in zip(built, options):
        torch.testing.assert_close(result[:4], reference.soft_prompt, rtol=1e-5, atol=1e-5)
        assert torch.equal(result[4:], table[torch.tensor(question + option)])
    torch.testing.assert_close(torch.tensor(weights), reference.weights)
    torch.testing.assert_close(torch.tensor(probabilities), reference.probabilities)


def test_output_is_cast_to_the_model_dtype():
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    entry = reg.add("a", random_adapter(), version=1)
    (result,), _ = build_all((table, torch.bfloat16, CPU), [(entry, [1, 2, 3])])
    assert result.dtype == torch.bfloat16


def test_unloading_while_queued_still_serves_the_queued_request():
    """The engine client holds a request's slot (acquire) while the route reads it."""
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    adapter = random_adapter(seed=7)
    entry = reg.add("a", adapter, version=1)

    async def run():
        route = ApiRoute(table, torch.float32, CPU)
        reg.acquire(entry)
        pending = asyncio.ensure_future(embeds(route, routed(entry, [4, 5])))
        await asyncio.sleep(0)  # gathering its step, not computed yet
        reg.remove("a")
        reg.add("b", random_adapter(seed=8), version=1)  # must not take the held slot
        result = await pending
        reg.release(entry)
        return result

    result = asyncio.run(run())
    expected = route_reference(adapter, table[torch.tensor([4, 5])]).soft_prompt
    torch.testing.assert_close(result[:4], expected)


def test_input_embeddings_are_read_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(VOCAB, HIDDEN)
    save_file({"model.embed_tokens.weight": table, "lm_head.weight": torch.zeros(2)},
              tmp_path / "model.safetensors")
    assert torch.equal(load_input_embeddings(tmp_path), table)


def test_a_request_that_fails_its_step_fails_alone():
    """A request the step cannot compute (here: a token id past the table, which the server
    refuses earlier) fails with its error; the requests routed in the same step are served."""
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    entry = reg.add("a", random_adapter(seed=1), version=1)
    good = [[1, 2, 3], [4, 5], [6]]

    async def run():
        route = ApiRoute(table, torch.float32, CPU)
        return await asyncio.gather(
            *(embeds(route, routed(entry, ids)) for ids in [good[0], [VOCAB + 7], *good[1:]]),
            return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[1], IndexError)
    for ids, result in zip(good, [results[0], *results[2:]]):
        reference = route_reference(entry.adapter, table[torch.tensor(ids)]).soft_prompt
        torch.testing.assert_close(result[:4], reference, rtol=1e-5, atol=1e-5)


def test_a_request_cancelled_while_leading_its_step_still_serves_those_that_joined_it():
    """The first request gathers the step; its caller goes away (a client disconnect)
    before the step is computed: the requests that joined it get their prompts."""
    table = torch.randn(VOCAB, HIDDEN)
    reg = AdapterRegistry(HIDDEN, 128, torch.device("cpu"))
    entry = reg.add("a", random_adapter(seed=5), version=1)
    steps = []

    async def run():
        route = ApiRoute(table, torch.float32, CPU, on_step=lambda n, s: steps.append(n))
        leader = asyncio.ensure_future(embeds(route, routed(entry, [1, 2])))
        joined = [asyncio.ensure_future(embeds(route, routed(entry, ids))) for ids in ([3], [4])]
        await asyncio.sleep(0)  # the leader gathers, and both join it
        leader.cancel()
        return await asyncio.wait_for(asyncio.gather(leader, *joined, return_exceptions=True), 10)

    leader, *joined = asyncio.run(run())
    assert isinstance(leader, asyncio.CancelledError) and steps == [3]
    for ids, result in zip(([3], [4]), joined):
        reference = route_reference(entry.adapter, table[torch.tensor(ids)]).soft_prompt
        torch.testing.assert_close(result[:4], reference, rtol=1e-5, atol=1e-5)
