"""The engine route (`--routing-location engine`), seen from this process: a request with an
adapter goes to the engine as its token ids and a routing key, and the engine's workers compute
the soft prompts of each step (vllm_model.py). Each adapter version is written into the
workers' banks once, when it becomes resident (a request that comes first waits for it); the
key names that version, so no cache can serve an older one. Once written, the entry keeps of an
adapter only its router, for showing a prompt's routing (`routing`) and for naming the experts
a "none"-scaled adapter keeps (`_experts`); the resident set keeps a decoded copy for its host
tier, unless it has none (adapters/residency.py)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from pathlib import Path

import torch

from ptmoe_serve.engine.engine import Engine
from ptmoe_serve.engine.vllm_model import MODALITY, AdapterRef, pack_adapters
from ptmoe_serve.adapters.bank import BankShape
from ptmoe_serve.adapters.registry import AdapterEntry
from ptmoe_serve.base_model import load_input_embeddings
from ptmoe_serve.routing.reference import kept_experts
from ptmoe_serve.routing.route import ExpertRouting, Route, RoutedRequest

logger = logging.getLogger(__name__)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("freeing an adapter bank in the engine failed: %s", future.exception())


class EngineRoute(Route):
    def __init__(self, engine: Engine, model_dir: Path):
        self.engine = engine
        self.model_dir = model_dir
        self._written: weakref.WeakKeyDictionary[AdapterEntry, asyncio.Future] = \
            weakref.WeakKeyDictionary()
        self._table: torch.Tensor | None = None

    async def engine_prompt(self, request: RoutedRequest) -> dict:
        """The request's token ids and routing key, once its adapter is in the workers'
        banks."""
        entry = request.entry
        ref = AdapterRef(entry.bank.shape, entry.slot, entry.name, entry.version)
        written = self._written.get(entry)
        # A write that failed is tried again by the next request.
        if written is None or (written.done() and (written.cancelled()
                                                   or written.exception() is not None)):
            written = self._start_write([entry])
        await asyncio.shield(written)
        return {"prompt_token_ids": request.token_ids,
                "multi_modal_data": {MODALITY: ref.to_key(request.route_tokens,
                                                          self._experts(request))}}

    def _experts(self, request: RoutedRequest) -> list[int] | None:
        """Under `router_scaling: "none"` the soft prompt is fixed by which experts the router
        keeps, not by the tokens it reads: the key names those experts, so every prompt that
        keeps them shares the soft prompt's KV blocks and whatever follows it (a system
        prompt, across conversations), and the workers mix them without routing. So it is
        with one expert (plain prompt tuning, a PEFT import): its weight is 1 either way."""
        config = request.entry.adapter.config
        if config.router_scaling != "none" and config.num_experts > 1:
            return None
        if config.top_k == config.num_experts:  # every expert kept: nothing to route
            return list(range(config.num_experts))
        routed = torch.tensor(request.token_ids[: request.route_tokens])
        return kept_experts(request.entry.adapter, self._embeddings()[routed])

    def routing(self, entry: AdapterEntry, token_ids: list[int]) -> ExpertRouting:
        return ExpertRouting.of(entry, self._embeddings()[torch.tensor(token_ids)])

    def preload(self, entry: AdapterEntry) -> None:
        """Start moving a just-loaded adapter to the workers, so that its first request
        (which waits for the move, and retries one that failed) most likely finds it there."""
        written = self._start_write([entry])
        # A failure is the first request's to see and retry, not the event loop's to log.
        written.add_done_callback(lambda future: future.cancelled() or future.exception())

    def drop_bank(self, shape: BankShape) -> None:
        """The registry freed this shape's bank: free the workers' copy. Sent after every write
        started before it (messages to the engine keep their order)."""
        dropped = asyncio.ensure_future(self.engine.drop_bank(
            [shape.num_experts, shape.prompt_length, shape.rank]))
        dropped.add_done_callback(_log_failure)

    def _start_write(self, entries: list[AdapterEntry]) -> asyncio.Future:
        # Packed and registered now, so a request arriving meanwhile waits for this write.
        written = asyncio.ensure_future(
            self._write_then_trim(self.engine.write_adapters(*pack_adapters(entries)), entries))
        for entry in entries:
            self._written[entry] = written
        return written

    @staticmethod
    async def _write_then_trim(write: Awaitable[None], entries: list[AdapterEntry]) -> None:
        await write
        for entry in entries:
            entry.adapter = entry.adapter.routing_only()

    def _embeddings(self) -> torch.Tensor:
        # Only `routing` (/v1/routing) and the keys of "none"-scaled adapters need the table
        # in this process: read it on first use.
        if self._table is None:
            self._table = load_input_embeddings(self.model_dir)
        return self._table
