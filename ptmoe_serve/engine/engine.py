"""vLLM's async engine, built from vLLM's own engine arguments, on one of two routes for
adapters' requests:

- in the engine: prompts go as token ids with a routing key, and the engine's workers compute
  the soft prompts of each step from the adapter banks they hold (vllm_model.py);
- through prompt embeddings: the soft prompt is computed in the API process and the request
  goes as `prompt_embeds` ([soft prompt; token embeddings]).

Requests for the bare base model go as token ids. All share vLLM's continuous batch."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

from ptmoe_serve.config import EngineSettings

GIB = 1024**3
SHARED_MEMORY = Path("/dev/shm")


def engine_args(settings: EngineSettings, vllm_args: argparse.Namespace) -> AsyncEngineArgs:
    """vLLM's engine arguments as its own server parses them, with the model and what each
    route needs set by this project."""
    args = AsyncEngineArgs.from_cli_args(vllm_args)
    if settings.routing_in_engine:
        from ptmoe_serve.engine.vllm_model import engine_args as routing_args

        route = routing_args(settings.max_soft_prompt_length)
    else:
        route = {"enable_prompt_embeds": True}
    kv = {} if settings.kv_cache_gib is None else {
        "kv_cache_memory_bytes": int(settings.kv_cache_gib * GIB)}
    return dataclasses.replace(args, model=settings.model_dir, tokenizer=settings.model_dir,
                               served_model_name=[settings.served_model_name], **route, **kv)


class Engine:
    """What the project needs of the engine beyond vLLM's client: its shape, and writing
    adapters into its workers' banks."""

    def __init__(self, llm: AsyncLLM):
        self.llm = llm
        model_config = llm.vllm_config.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.max_model_len: int = model_config.max_model_len
        self.hidden_size: int = model_config.get_hidden_size()
        self.vocab_size: int = model_config.get_vocab_size()
        parallel = llm.vllm_config.parallel_config
        self._workers_share_this_host = (SHARED_MEMORY.is_dir() and parallel.nnodes == 1
                                         and parallel.distributed_executor_backend != "ray")

    async def write_adapters(self, banks: list[list[int]], tensors: dict[str, torch.Tensor]
                             ) -> None:
        """Put adapters into every worker's banks (vllm_model.pack_adapters' output). Where
        the workers share this machine the tensors go through a file in shared memory, which
        they map: vLLM's messaging would copy tens of megabytes several times on the way."""
        if not self._workers_share_this_host:
            data = safetensors.torch.save(tensors)
            await self.llm.collective_rpc("ptmoe_write", args=(banks, data))
            return
        with tempfile.NamedTemporaryFile(dir=SHARED_MEMORY, prefix="ptmoe-",
                                         suffix=".safetensors") as file:
            safetensors.torch.save_file(tensors, file.name)
            await self.llm.collective_rpc("ptmoe_write", args=(banks, file.name))

    async def drop_bank(self, shape: list[int]) -> None:
        await self.llm.collective_rpc("ptmoe_drop", args=(shape,))

    @property
    def num_unfinished_requests(self) -> int:
        return self.llm.output_processor.get_num_unfinished_requests()
