"""One settings object, built from the command line and handed to the constructors. vLLM's
own server options travel as the namespace its parser made."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

# A completion or chat request's vllm_xargs key: how many leading prompt tokens the router
# reads (all when absent), so that a scored continuation does not steer its own soft prompt.
# Here, at the bottom, because the server and its clients (evaluation, lm-eval) both name it.
ROUTE_TOKENS = "ptmoe_route_tokens"


@dataclass(frozen=True)
class EngineSettings:
    model_dir: str
    served_model_name: str
    # The routing step in vLLM's workers (engine/vllm_model.py) rather than in the API process.
    routing_in_engine: bool = False
    # The longest soft prompt the in-engine route accepts (vLLM sizes its encoder cache by it).
    max_soft_prompt_length: int = 128
    # KV cache size; None leaves it to --gpu-memory-utilization.
    kv_cache_gib: float | None = None


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineSettings
    adapters_dir: Path
    # vLLM's server options (host, port, engine and serving flags), as its parser made them.
    vllm_args: argparse.Namespace = field(default_factory=argparse.Namespace)
    # Further folders that POST /v1/adapters may load from.
    allowed_adapter_roots: tuple[Path, ...] = ()
    routing_device: str = "cpu"
    # "auto": the fused Triton kernels on CUDA, else batched torch; "triton" or "torch" forces.
    routing_kernel: str = "auto"
    # Management's key: given, or generated at start-up (cli.py); never the API key.
    admin_api_key: str | None = None
    api_key: str | None = None
    # Host header names answered besides loopback ones; None: any (see api/auth.py).
    allowed_hosts: frozenset[str] | None = frozenset()
    metrics_need_key: bool = False
    max_upload_bytes: int = 64 * 1024 * 1024
    # Largest body of any other request (completions, chat, ...).
    max_request_bytes: int = 8 * 1024 * 1024
    # Sequences (prompts x n) per request; logprob entries per engine request (engine/limits.py).
    max_sequences: int = 256
    max_logprobs: int = 1_000_000
    # Seconds between looks at the adapters folder; 0 turns the watching off.
    watch_interval: float = 2.0
    # Seconds a change waits for the store's lock held elsewhere, before a 503 (disk.py).
    store_lock_timeout: float = 5.0
    # /v1/models lists every adapter of a store holding at most this many.
    max_listed_adapters: int = 10_000
    # Adapters resident in the banks at most (None: as many as the banks' memory budget
    # holds, engine/services.py), decoded on the host besides (None: as many), pinned
    # (loaded at start-up, never evicted), and how long a request for a cold adapter waits
    # for a slot while every one is held.
    max_resident_adapters: int | None = None
    max_cpu_adapters: int | None = None
    pinned: tuple[str, ...] = ()
    adapter_wait_seconds: float = 10.0
    # Start a fine-tuning worker process beside the server (train/worker.py), training on
    # this many threads (None: half the cores).
    fine_tune_worker: bool = True
    fine_tune_threads: int | None = None
    # Its niceness: serving goes first.
    fine_tune_niceness: int = 10
