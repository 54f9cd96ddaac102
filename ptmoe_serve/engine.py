"""The vLLM async engine, in this process, on one of two routes for adapters' requests:

- in the engine: prompts go as token ids with a routing key, and the engine's workers compute
  the soft prompts of each step from the adapter banks they hold (engine_model.py);
- through prompt embeddings: the soft prompt is computed here and the request goes as
  `prompt_embeds` ([soft prompt; token embeddings]).

Requests for the bare base model go as token ids. All share vLLM's continuous batch."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

GIB = 1024**3
SHARED_MEMORY = Path("/dev/shm")


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
    # The routing step in vLLM's workers (engine_model.py) rather than in this process.
    routing_in_engine: bool = False
    # The longest soft prompt the in-engine route accepts (vLLM sizes its encoder cache by it).
    max_soft_prompt_length: int = 128


class Engine:
    def __init__(self, settings: EngineSettings):
        if settings.routing_in_engine:
            from ptmoe_serve.engine_model import engine_args

            routing_args = engine_args(settings.max_soft_prompt_length)
        else:
            routing_args = {"enable_prompt_embeds": True}
        args = AsyncEngineArgs(
            model=settings.model_dir,
            served_model_name=settings.served_model_name,
            **routing_args,
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
        parallel = self._llm.vllm_config.parallel_config
        self._workers_share_this_host = (SHARED_MEMORY.is_dir() and parallel.nnodes == 1
                                         and parallel.distributed_executor_backend != "ray")

    def generate(self, prompt: dict, params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]:
        """`prompt`: vLLM's prompt dict (token ids, prompt embeddings, or token ids with a
        soft prompt's routing key)."""
        return self._llm.generate(prompt, params, request_id)

    async def write_adapters(self, banks: list[list[int]], tensors: dict[str, torch.Tensor]
                             ) -> None:
        """Put adapters into every worker's banks (engine_model.pack_adapters' output). Where
        the workers share this machine the tensors go through a file in shared memory, which
        they map: vLLM's messaging would copy tens of megabytes several times on the way."""
        if not self._workers_share_this_host:
            data = safetensors.torch.save(tensors)
            await self._llm.collective_rpc("ptmoe_write", args=(banks, data))
            return
        with tempfile.NamedTemporaryFile(dir=SHARED_MEMORY, prefix="ptmoe-",
                                         suffix=".safetensors") as file:
            safetensors.torch.save_file(tensors, file.name)
            await self._llm.collective_rpc("ptmoe_write", args=(banks, file.name))

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
