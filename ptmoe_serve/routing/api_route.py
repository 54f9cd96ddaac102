"""The api route (`--routing-location api`): requests that arrive together get their prompt
embeddings, [soft prompt; token embeddings], from one routing step (step.py) in this process,
and vLLM takes them as `prompt_embeds`.

The first request to arrive while no step gathers leads the next one: it yields to the event
loop once, so that the requests arriving with it join, and computes them all at once, its own
first: one embedding gather over all tokens and one routing step whatever adapters the requests
name (the fused Triton kernels on a CUDA device, else batched torch). The engine client holds
each request's slot meanwhile."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ptmoe_serve.adapters.registry import AdapterEntry
from ptmoe_serve.routing.route import ExpertRouting, Route, RoutedRequest
from ptmoe_serve.routing.step import route_step


@dataclass
class _Joined:
    """A request that joined another's step."""

    request: RoutedRequest
    future: asyncio.Future  # its prompt embeddings [T + L, H], model dtype, on the CPU


class ApiRoute(Route):
    def __init__(
        self,
        embedding_table: torch.Tensor,
        model_dtype: torch.dtype,
        device: torch.device,
        on_step: Callable[[int, float], None] = lambda batch_size, seconds: None,
        fused: bool | None = None,
    ):
        # In the model's dtype: the embeddings the model reads, and half the bytes in bfloat16.
        self.table = embedding_table.to(device=device, dtype=model_dtype)
        self.model_dtype = model_dtype
        self.on_step = on_step
        # None: the fused kernels where they can run (CUDA with Triton), else batched torch.
        self.fused = fused if fused is not None else _fused_available(device)
        # The requests joining the next step, while its leader gathers them; else None.
        self._joining: list[_Joined] | None = None

    async def engine_prompt(self, request: RoutedRequest) -> dict:
        if self._joining is not None:
            joined = _Joined(request, asyncio.get_running_loop().create_future())
            self._joining.append(joined)
            return {"prompt_embeds": await joined.future}
        self._joining = joining = []
        try:
            await asyncio.sleep(0)  # the requests that arrived with this one join its step
        finally:  # cancelled too: the joined requests are served
            self._joining = None
            embeds = self._step(request, joining)
        if isinstance(embeds, Exception):
            raise embeds
        return {"prompt_embeds": embeds}

    def _step(self, request: RoutedRequest, joining: list[_Joined]
              ) -> torch.Tensor | Exception:
        """One routing step for the leader's request and those that joined it: each joined
        request's future is set, and the leader's outcome returned."""
        started = time.perf_counter()
        outcomes = self._outcomes([request, *(joined.request for joined in joining)])
        for joined, outcome in zip(joining, outcomes[1:]):
            if joined.future.done():  # its caller went away
                continue
            if isinstance(outcome, Exception):
                joined.future.set_exception(outcome)
            else:
                joined.future.set_result(outcome)
        self.on_step(len(outcomes), time.perf_counter() - started)
        return outcomes[0]

    def _outcomes(self, batch: list[RoutedRequest]) -> list[torch.Tensor | Exception]:
        """The step's results; where the step fails, each request is computed alone, so a
        failure fails only the request that causes it (and a step too large for memory still
        serves its requests one by one)."""
        try:
            return self.compute(batch)
        except Exception as e:
            if len(batch) == 1:
                return [e]
            return [self._outcomes([request])[0] for request in batch]

    @torch.inference_mode()
    def compute(self, batch: list[RoutedRequest]) -> list[torch.Tensor]:
        """[soft prompt; token embeddings] of each request, from one routing step."""
        lengths = [len(request.token_ids) for request in batch]
        flat_ids = torch.tensor([t for request in batch for t in request.token_ids],
                                device=self.table.device)
        embeddings = self.table.index_select(0, flat_ids).split(lengths)
        routed = [flat_ids.new_tensor(request.token_ids[: request.route_tokens])
                  for request in batch]
        targets = [(request.entry.bank, request.entry.bank.shape, request.entry.slot)
                   for request in batch]
        soft_prompts = route_step(targets, routed, self.table.shape[1], self._embed,
                                  self.table if self.fused else None, self.model_dtype)
        return [torch.cat([soft, tokens]).cpu() for soft, tokens in zip(soft_prompts, embeddings)]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, ids)

    def routing(self, entry: AdapterEntry, token_ids: list[int]) -> ExpertRouting:
        embeddings = self.table[torch.tensor(token_ids, device=self.table.device)]
        return ExpertRouting.of(entry, embeddings.to(entry.adapter.router_weight.device))


def _fused_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
