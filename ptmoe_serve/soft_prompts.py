"""The routing step of the serving path: requests that arrive together get their prompt
embeddings, [soft prompt; token embeddings], from one batched computation.

Each request awaits `build`; a background task takes everything queued since its last step and
computes it at once: one embedding gather over all tokens and, per adapter shape, one batched
routing whatever adapters the requests name: the fused Triton kernels on a CUDA device
(routing_kernel.py), else the batched torch version (one segment mean, `AdapterBank.route`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from ptmoe_serve.registry import AdapterEntry, AdapterRegistry
from ptmoe_serve.routing import gate_reference, segment_means

# Names of the input embedding matrix in common Hugging Face architectures.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def load_input_embeddings(model_dir: Path) -> torch.Tensor:
    """Read only the input embedding matrix [vocab, H] from a model's safetensors files."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        candidates = [(key, model_dir / file) for key, file in weight_map.items()]
    else:
        candidates = []
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                candidates += [(key, file) for key in f.keys()]
    for key, file in candidates:
        if key.endswith(EMBEDDING_SUFFIXES):
            with safe_open(file, "pt") as f:
                return f.get_tensor(key)
    raise ValueError(f"no input embedding matrix ({', '.join(EMBEDDING_SUFFIXES)}) in {model_dir}")


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
        device = self.registry.device
        lengths = [len(item.token_ids) for item in batch]
        routed = torch.tensor([item.route_tokens for item in batch], device=device)
        flat_ids = torch.tensor([t for item in batch for t in item.token_ids], device=device)
        per_request = self.table.index_select(0, flat_ids).split(lengths)
        means = None if self.fused else segment_means(
            torch.cat([e[: item.route_tokens] for e, item in zip(per_request, batch)]), routed)

        by_bank: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(batch):
            by_bank[id(item.entry.bank)].append(i)
        results: list[PromptEmbeds | None] = [None] * len(batch)
        for rows in by_bank.values():
            bank = batch[rows[0]].entry.bank
            slots = torch.tensor([batch[i].entry.slot for i in rows], device=device)
            if self.fused:
                from ptmoe_serve.routing_kernel import route_fused

                group_ids = torch.cat([flat_ids.new_tensor(batch[i].token_ids[: batch[i].route_tokens])
                                       for i in rows])
                offsets = torch.nn.functional.pad(routed[rows].cumsum(0), (1, 0))
                prompts = route_fused(self.table, group_ids, offsets, slots, bank.tensors)[0]
            else:
                prompts = bank.route(slots, means[rows]).soft_prompt
            soft_prompts = prompts.to(self.model_dtype)
            for j, i in enumerate(rows):
                results[i] = PromptEmbeds(torch.cat([soft_prompts[j], per_request[i]]).cpu())
        return results

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
