"""The api route's batcher: requests that arrive together get their prompt embeddings,
[soft prompt; token embeddings], from one routing step (step.py).

Each request awaits `build`; a background task takes everything queued since its last step and
computes it at once: one embedding gather over all tokens and one routing step whatever
adapters the requests name (the fused Triton kernels on a CUDA device, else batched torch)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ptmoe_serve.adapters.registry import AdapterEntry, AdapterRegistry
from ptmoe_serve.routing.reference import gate_reference
from ptmoe_serve.routing.step import route_step

@dataclass(frozen=True)
class PromptEmbeds:
    embeds: torch.Tensor  # [T + L, H] in the model dtype, on the CPU, ready for the engine

    @property
    def engine_prompt(self) -> dict:
        return {"prompt_embeds": self.embeds}


@dataclass
class _Pending:
    entry: AdapterEntry
    token_ids: list[int]
    route_tokens: int  # the router reads token_ids[:route_tokens]
    future: asyncio.Future


class SoftPromptBatcher:
    def __init__(
        self,
        registry: AdapterRegistry,
        embedding_table: torch.Tensor,
        model_dtype: torch.dtype,
        on_step: Callable[[int, float], None] = lambda batch_size, seconds: None,
        fused: bool | None = None,
    ):
        self.registry = registry
        # In the model's dtype: the embeddings the model reads, and half the bytes in bfloat16.
        self.table = embedding_table.to(device=registry.device, dtype=model_dtype)
        self.model_dtype = model_dtype
        self.on_step = on_step
        # None: the fused kernels where they can run (CUDA with Triton), else batched torch.
        self.fused = fused if fused is not None else _fused_available(registry.device)
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def write_all(self, batches: Iterable[list[AdapterEntry]]) -> None:
        """Adapters loaded at start-up land in this process's banks: nothing to move."""
        for _ in batches:
            pass

    def preload(self, entry: AdapterEntry) -> None:
        """So is an adapter loaded while serving."""

    def drop_bank(self, shape) -> None:
        """A bank the registry dropped is freed with it: nothing else holds its tensors."""

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def build(self, entry: AdapterEntry, token_ids: list[int],
                    route_tokens: int | None = None) -> PromptEmbeds:
        """The request's prompt embeddings; the router reads the first `route_tokens` token
        ids (all by default)."""
        future = asyncio.get_running_loop().create_future()
        self.registry.acquire(entry)
        self._queue.append(_Pending(entry, token_ids, route_tokens or len(token_ids), future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            started = time.perf_counter()
            try:
                for item, outcome in zip(batch, self._outcomes(batch)):
                    if item.future.done():
                        continue
                    if isinstance(outcome, Exception):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result(outcome)
            finally:
                for item in batch:
                    self.registry.release(item.entry)
            self.on_step(len(batch), time.perf_counter() - started)

    def _outcomes(self, batch: list[_Pending]) -> list[PromptEmbeds | Exception]:
        """The step's results; where the step fails, each request is computed alone, so a
        failure fails only the request that causes it (and a step too large for memory still
        serves its requests one by one)."""
        try:
            return self.compute(batch)
        except Exception as e:
            if len(batch) == 1:
                return [e]
            return [self._outcomes([item])[0] for item in batch]

    @torch.inference_mode()
    def compute(self, batch: list[_Pending]) -> list[PromptEmbeds]:
        """[soft prompt; token embeddings] of each request, from one routing step."""
        lengths = [len(item.token_ids) for item in batch]
        flat_ids = torch.tensor([t for item in batch for t in item.token_ids],
                                device=self.registry.device)
        embeddings = self.table.index_select(0, flat_ids).split(lengths)
        routed = [flat_ids.new_tensor(item.token_ids[: item.route_tokens]) for item in batch]
        targets = [(item.entry.bank, item.entry.bank.shape, item.entry.slot) for item in batch]
        soft_prompts = route_step(targets, routed, self.table.shape[1], self._embed,
                                  self.table if self.fused else None, self.model_dtype)
        return [PromptEmbeds(torch.cat([soft, tokens]).cpu())
                for soft, tokens in zip(soft_prompts, embeddings)]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, ids)

    def routing(self, entry: AdapterEntry, token_ids: list[int]) -> tuple[list[float], list[float]]:
        """Expert weights and router probabilities for a prompt (the router alone)."""
        embeddings = self.table[torch.tensor(token_ids, device=self.table.device)]
        weights, probabilities = gate_reference(
            entry.adapter, embeddings.to(entry.adapter.router_weight.device))
        return weights.tolist(), probabilities.tolist()


def _fused_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
