"""The systems compared, each started by the benchmark with the same model, dtype and engine
settings (vLLM's defaults: compiled, prefix caching on), all up at once so that rounds can
alternate between them:

- `ptmoe`: this server with N PT-MoE adapters of each prompt length T, the routing step in
  vLLM's workers; `ptmoe-api`: the same with the routing step in the API process, handing vLLM
  prompt embeddings;
- `vllm`: vLLM's own OpenAI server with the bare model, prompts T tokens longer (the limit);
  `vllm-instruction`: the same server, every prompt behind one long system prompt (what an
  adapter replaces), served from vLLM's prefix cache;
- `vllm-lora`: vLLM's own server with N LoRA adapters of about the same parameter count,
  loaded on demand from a folder (vLLM's filesystem resolver), as multi-LoRA users run it;
- `transformers`: a Hugging Face generation loop with the soft prompt, in batches.

The HTTP systems are context managers yielding an `Endpoint` (or one per T); the transformers
loop runs the workload in process and returns the same summary as the load generator."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from bench.adapters import write_lora_adapters, write_ptmoe_adapters
from bench.loadgen import RequestRecord, summarize
from bench.server_process import start_server, stop_server
from bench.workload import BenchRequest
from ptmoe_serve.adapters.format import read_adapter

GIB = 2**30


# Every system `bench.run` knows, in the order reports list them.
SYSTEMS = ("ptmoe", "ptmoe-api", "vllm", "vllm-instruction", "vllm-lora", "transformers")


@dataclass(frozen=True)
class SystemConfig:
    model_dir: Path
    base_name: str
    work_dir: Path
    dtype: str = "bfloat16"
    prompt_lengths: tuple[int, ...] = (40,)  # T of the adapters, one bank each
    num_experts: int = 2
    rank: int = 36
    router_scaling: str = "probability"  # the PT-MoE adapters'
    lora_rank: int = 1
    lora_targets: tuple[str, ...] = ("q_proj",)
    max_model_len: int = 1024
    kv_cache_gib: float = 2.0
    max_num_seqs: int = 64
    max_loras: int = 16
    enforce_eager: bool = False  # vLLM compiles the model by default, on the CPU too
    ptmoe_args: tuple[str, ...] = ()  # more `ptmoe-serve serve` options, for this server only
    # vLLM's CPU build keeps one core from its worker by default; on a 2-core machine that
    # halves the compute (43 against 27 tokens/s at 16 concurrent requests, measured here).
    # The same value goes to every vLLM-based system. None keeps vLLM's default.
    cpu_reserved_cores: int | None = 0

    def engine_env(self) -> dict[str, str]:
        # What `ptmoe-serve serve` sets on the CPU (vLLM 0.32 cannot load its AOT artifacts
        # there): every vLLM-based system compiles the same way.
        env = {} if torch.cuda.is_available() else {"VLLM_USE_AOT_COMPILE": "0"}
        if self.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.cpu_reserved_cores)
        return env


@dataclass(frozen=True)
class Endpoint:
    url: str
    model_name: Callable[[int], str]
    prompt_ids: Callable[[BenchRequest], list[int]]
    info: dict
    pid: int  # the API server's process; vLLM's engine processes are its children

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the API server process and of its engine processes."""
        import psutil

        api = psutil.Process(self.pid)
        engine = 0.0
        for child in api.children(recursive=True):
            try:
                times = child.cpu_times()
                engine += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        times = api.cpu_times()
        return {"api_process": times.user + times.system, "engine_processes": engine}


def _engine_args(config: SystemConfig) -> list[str]:
    return ["--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
            "--max-num-seqs", str(config.max_num_seqs), "--served-model-name", config.base_name,
            *(["--enforce-eager"] if config.enforce_eager else [])]


def ptmoe_store_dir(config: SystemConfig, num_adapters: int) -> Path:
    return config.work_dir / f"ptmoe-{num_adapters}"


def ptmoe_store(config: SystemConfig, num_adapters: int) -> dict[int, list[Path]]:
    """`num_adapters` adapters of each prompt length T in one store, `t<T>-<i>`, written once."""
    store = ptmoe_store_dir(config, num_adapters)
    folders = {}
    for length in config.prompt_lengths:
        folders[length] = [store / f"t{length}-{i}" for i in range(num_adapters)]
        if not folders[length][-1].exists():
            # Initialised from T token embeddings, an adapter's rank is at most T.
            write_ptmoe_adapters(store, config.model_dir, config.base_name, num_adapters,
                                 length, config.num_experts, min(config.rank, length),
                                 router_scaling=config.router_scaling,
                                 prefix=f"t{length}-")
    return folders


@contextmanager
def ptmoe(config: SystemConfig, num_adapters: int, routing_location: str = "engine"
          ) -> Iterator[dict[int, Endpoint]]:
    """One server holding the adapters of every T; an endpoint per T."""
    folders = ptmoe_store(config, num_adapters)
    store = ptmoe_store_dir(config, num_adapters)
    server = start_server(["--model", str(config.model_dir), "--adapters", str(store),
                           "--kv-cache-gib", str(config.kv_cache_gib), "--watch-interval", "0",
                           "--routing-location", routing_location, *_engine_args(config),
                           *config.ptmoe_args],
                          config.work_dir / f"ptmoe-{routing_location}-{num_adapters}.log",
                          env=config.engine_env())
    try:
        def endpoint(names: list[str], parameters: int) -> Endpoint:
            return Endpoint(server.url, lambda i: names[i], lambda r: r.prompt_ids,
                            {"adapter_parameters": parameters,
                             "routing_location": routing_location}, server.process.pid)

        yield {length: endpoint([f.name for f in group], read_adapter(group[0]).num_parameters)
               for length, group in folders.items()}
    finally:
        stop_server(server)


def vllm_command() -> list[str]:
    # `vllm serve` runs this same server; its launcher needs the distribution named "vllm".
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def _vllm_args(config: SystemConfig) -> list[str]:
    return ["--model", str(config.model_dir), "--kv-cache-memory-bytes",
            str(int(config.kv_cache_gib * GIB)), "--disable-uvicorn-access-log",
            *_engine_args(config)]


def with_filler(prompt_ids: list[int], length: int) -> list[int]:
    """`length` tokens in front of the prompt, where a soft prompt would be: the prompt's own
    tokens repeated, so no two requests share that prefix and vLLM's prefix cache cannot skip
    it (soft prompts differ per request too)."""
    return [prompt_ids[i % len(prompt_ids)] for i in range(length)] + prompt_ids


@contextmanager
def vllm_bare(config: SystemConfig) -> Iterator[Endpoint]:
    """The bare model, prompts as they are; `padded` and `instructed` make the peers."""
    server = start_server(_vllm_args(config), config.work_dir / "vllm.log",
                          command=vllm_command(), env=config.engine_env())
    try:
        yield Endpoint(server.url, lambda i: config.base_name, lambda r: r.prompt_ids, {},
                       server.process.pid)
    finally:
        stop_server(server)


def padded(bare: Endpoint, length: int) -> Endpoint:
    """Each prompt gets `length` more tokens in front, where a soft prompt of T=length is."""
    return replace(bare, prompt_ids=lambda r: with_filler(r.prompt_ids, length),
                   info={"extra_prompt_tokens": length})


def instructed(bare: Endpoint, instruction: list[int]) -> Endpoint:
    """Every prompt behind the same instruction tokens (a system prompt): after the first
    request vLLM's prefix cache holds its KV blocks, so only the prompt itself is prefilled."""
    return replace(bare, prompt_ids=lambda r: instruction + r.prompt_ids,
                   info={"instruction_tokens": len(instruction)})


@contextmanager
def vllm_lora(config: SystemConfig, num_adapters: int) -> Iterator[Endpoint]:
    from bench.adapters import lora_parameters

    folder = config.work_dir / f"lora-{num_adapters}"
    folders = write_lora_adapters(folder, config.model_dir, num_adapters, config.lora_rank,
                                  list(config.lora_targets))
    resolver = {"VLLM_PLUGINS": "lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(folder),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    server = start_server([*_vllm_args(config), "--enable-lora", "--max-lora-rank",
                           str(config.lora_rank), "--max-loras",
                           str(min(config.max_loras, num_adapters)), "--max-cpu-loras",
                           str(max(num_adapters, config.max_loras))],
                          config.work_dir / f"lora-{num_adapters}.log",
                          command=vllm_command(), env={**config.engine_env(), **resolver})
    try:
        names = [f.name for f in folders]
        yield Endpoint(server.url, lambda i: names[i], lambda r: r.prompt_ids,
                       {"adapter_parameters": lora_parameters(folders[0]),
                        "lora_rank": config.lora_rank, "lora_targets": list(config.lora_targets),
                        "max_loras": min(config.max_loras, num_adapters)}, server.process.pid)
    finally:
        stop_server(server)


@torch.inference_mode()
def transformers_loop(config: SystemConfig, requests: list[BenchRequest], num_adapters: int,
                      batch_size: int) -> dict:
    """What a prompt-tuning user runs today: route each prompt with the plain reference, then
    `generate` from inputs_embeds, `batch_size` requests at a time (prompts have equal length,
    so batches need no padding). Adapters of the longest T."""
    from transformers import AutoModelForCausalLM

    from ptmoe_serve.routing.reference import route_reference

    dtype = getattr(torch, config.dtype)
    folders = ptmoe_store(config, num_adapters)[max(config.prompt_lengths)]
    adapters = [read_adapter(folder) for folder in folders]
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=dtype).eval()
    embed = model.get_input_embeddings()
    records: list[RequestRecord] = []
    started = time.perf_counter()
    for offset in range(0, len(requests), batch_size):
        batch = requests[offset:offset + batch_size]
        batch_started = time.perf_counter()
        rows = []
        for request in batch:
            tokens = embed(torch.tensor(request.prompt_ids))
            soft = route_reference(adapters[request.adapter_index], tokens.float()).soft_prompt
            rows.append(torch.cat([soft.to(dtype), tokens]))
        new = batch[0].max_tokens
        model.generate(inputs_embeds=torch.stack(rows), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=model.config.eos_token_id)
        latency = time.perf_counter() - batch_started
        records += [RequestRecord(r.adapter_index, True, None, latency, new) for r in batch]
    return summarize(records, time.perf_counter() - started)
