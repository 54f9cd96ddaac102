"""What a route is: how a request for an adapter reaches vLLM's engine with its soft prompt.

Two routes implement it. The engine route (engine/engine_route.py) sends the prompt's token ids
with a routing key, and vLLM's workers run the routing step beside their copy of the banks; the
api route (routing/api_route.py) runs the routing step in this process and hands vLLM prompt
embeddings. The engine client (engine/client.py) resolves a request once, into a
`RoutedRequest`, and holds its adapter's slot while the route and the engine read it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ptmoe_serve.adapters.bank import BankShape
from ptmoe_serve.adapters.registry import AdapterEntry
from ptmoe_serve.routing.reference import gate_reference


@dataclass(frozen=True)
class RoutedRequest:
    """One prompt for one adapter, as the engine client resolved it."""

    entry: AdapterEntry
    token_ids: list[int]
    route_tokens: int  # the router reads token_ids[:route_tokens]


@dataclass(frozen=True)
class ExpertRouting:
    """The routing a prompt gets: each expert's router probability, and its weight applied."""

    expert_weights: list[float]
    expert_probabilities: list[float]

    @staticmethod
    def of(entry: AdapterEntry, token_embeddings: torch.Tensor) -> ExpertRouting:
        weights, probabilities = gate_reference(entry.adapter, token_embeddings)
        return ExpertRouting(weights.tolist(), probabilities.tolist())


class Route(ABC):
    """How a request for an adapter reaches vLLM's engine with its soft prompt, and what the
    route does when adapters come and go."""

    @abstractmethod
    async def engine_prompt(self, request: RoutedRequest) -> dict:
        """The prompt vLLM's engine takes for this request (its token ids and routing key, or
        its prompt embeddings)."""

    @abstractmethod
    def routing(self, entry: AdapterEntry, token_ids: list[int]) -> ExpertRouting:
        """The routing these prompt tokens get under this adapter (its router alone)."""

    def preload(self, entry: AdapterEntry) -> None:
        """An adapter was just placed in the banks (the residency's `on_resident`)."""

    def drop_bank(self, shape: BankShape) -> None:
        """A shape's bank was freed: its last adapter went (the registry's
        `on_bank_dropped`)."""
