"""The vLLM async engine, started with prompt embeddings enabled, in this process.

Requests with an adapter reach it as `prompt_embeds` ([soft prompt; token embeddings]); requests
for the bare base model as token ids. Both share vLLM's continuous batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

GIB = 1024**3


@dataclass(frozen=True)
class EngineSettings:
    model_dir: str
    served_model_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    seed: int = 0


class Engine:
    def __init__(self, settings: EngineSettings):
        args = AsyncEngineArgs(
            model=settings.model_dir,
            served_model_name=settings.served_model_name,
            enable_prompt_embeds=True,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_memory_bytes=(
                int(settings.kv_cache_gib * GIB) if settings.kv_cache_gib is not None else None
            ),
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            seed=settings.seed,
            disable_log_stats=True,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        model_config = self._llm.vllm_config.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.max_model_len: int = model_config.max_model_len
        self.hidden_size: int = model_config.get_hidden_size()
        self.vocab_size: int = model_config.get_vocab_size()

    def generate(
        self, prompt: torch.Tensor | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """A [positions, H] tensor goes in as prompt embeddings, a list as token ids."""
        if isinstance(prompt, torch.Tensor):
            return self._llm.generate({"prompt_embeds": prompt}, params, request_id)
        return self._llm.generate({"prompt_token_ids": prompt}, params, request_id)

    @property
    def num_unfinished_requests(self) -> int:
        return self._llm.output_processor.get_num_unfinished_requests()

    @property
    def is_running(self) -> bool:
        return not self._llm.errored

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        self._llm.shutdown()
