"""Serving's options, each written once with its default, bounds and help (`ServeOptions`:
`ptmoe-serve serve` builds its parser from it), and the settings start-up derives from them
and hands to the constructors. vLLM's own server options travel as the namespace its parser
made."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ptmoe_serve.disk import DEFAULT_LOCK_TIMEOUT

# A completion or chat request's vllm_xargs key: how many leading prompt tokens the router
# reads (all when absent), so that a scored continuation does not steer its own soft prompt.
# Here, at the bottom, because the server and its clients (evaluation, lm-eval) both name it.
ROUTE_TOKENS = "ptmoe_route_tokens"
MIB = 1024 * 1024
# The KV cache on a machine without a GPU, where --gpu-memory-utilization means nothing.
CPU_KV_CACHE_GIB = 2.0


def option(default, help: str, *, group: str | None = None, metavar: str | None = None,
           **bounds):
    """A field that is also a command-line option, `--field-name` (cli.py): in its help group;
    repeatable where it is a tuple; turned off by `--no-field-name` where it is a bool that
    defaults to True."""
    extra = {"group": group, "metavar": metavar, "repeatable": isinstance(default, tuple)}
    return Field(default, description=help,
                 json_schema_extra={k: v for k, v in extra.items() if v}, **bounds)


ACCESS = "adapters and access"
ROUTING = "the routing step"


class ServeOptions(BaseModel):
    """`ptmoe-serve serve`'s own options (vLLM's are vLLM's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: Path = option(Path("adapters"), "folder of adapters to load at start",
                             metavar="DIR")
    kv_cache_gib: float | None = option(
        None, "KV cache size in GiB; overrides --gpu-memory-utilization (default on CPU: "
              f"{CPU_KV_CACHE_GIB})", metavar="GIB", gt=0)
    allow_adapter_path: tuple[Path, ...] = option(
        (), "a further folder POST /v1/adapters may load from (repeatable; --adapters is "
            "always allowed)", group=ACCESS, metavar="DIR")
    max_resident_adapters: int | None = option(
        None, "adapters the banks hold at most, across all shapes; the store may hold any "
              "number, each read when a request first names it (default: as many of the "
              "paper's shape as 1 GiB holds, on a GPU half the memory "
              "--gpu-memory-utilization leaves)", group=ACCESS, metavar="N", ge=1)
    max_cpu_adapters: int | None = option(
        None, "adapters kept decoded in host memory besides, so that an evicted one comes back "
              "without a read (default: --max-resident-adapters)", group=ACCESS, metavar="N",
        ge=0)
    pin: tuple[str, ...] = option(
        (), "an adapter loaded at start-up and never evicted (repeatable)", group=ACCESS,
        metavar="NAME")
    adapter_wait_seconds: float = option(
        10.0, "how long a request for a cold adapter waits for a slot while running requests "
              "hold every one, before a 503", group=ACCESS, metavar="SECONDS", ge=0)
    watch_interval: float = option(
        2.0, "seconds between looks at --adapters for folders copied in or removed; 0 turns it "
             "off", group=ACCESS, metavar="SECONDS", ge=0)
    store_lock_timeout: float = option(
        DEFAULT_LOCK_TIMEOUT, "how long a change waits for the store's lock held by another "
                              "server or process before it answers 503 store_busy, naming the "
                              "holder; requests never wait for it", group=ACCESS,
        metavar="SECONDS", gt=0)
    max_listed_adapters: int = option(
        10_000, "/v1/models lists every adapter in the store while it holds at most N; beyond, "
                "the resident, pinned and newest adapters and the count (GET /v1/adapters "
                "pages through all)", group=ACCESS, metavar="N", ge=0)
    max_upload_mb: float = option(
        64.0, "largest upload accepted: an adapter, or a fine-tuning file", group=ACCESS,
        metavar="MB", gt=0)
    fine_tune_worker: bool = option(
        True, "start no fine-tuning worker beside the server (jobs then wait for `ptmoe-serve "
              "fine-tune-worker` over the same store)", group=ACCESS)
    fine_tune_niceness: int = option(
        10, "the fine-tuning worker's niceness, so that serving goes first (0 trains at the "
            "server's priority)", group=ACCESS, metavar="N", ge=0, le=19)
    fine_tune_threads: int | None = option(
        None, "threads the fine-tuning worker trains on (default: half the cores, at least "
              "one)", group=ACCESS, metavar="N", ge=1)
    max_request_mb: float = option(
        8.0, "largest request body but uploads (completions, chat, ...); larger ones get 413 "
             "before they are parsed", group=ACCESS, metavar="MB", gt=0)
    max_sequences_per_request: int = option(
        256, "most sequences (prompts x n) one request may ask for", group=ACCESS,
        metavar="N", ge=1)
    max_logprobs_per_request: int = option(
        1_000_000, "most logprob entries one prompt's request may return: n x max_tokens x "
                   "(logprobs + 1), prompt logprobs included", group=ACCESS, metavar="N", ge=1)
    api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on every route but /health, /ping and "
              "/metrics (default: $PTMOE_API_KEY)", group=ACCESS, metavar="KEY")
    admin_api_key: str | None = option(
        None, "the key adapter management needs (default: $PTMOE_ADMIN_API_KEY, else one "
              "generated once into CACHE_DIR/admin.key, readable by this user only)",
        group=ACCESS, metavar="KEY")
    api_key_file: Path | None = option(
        None, "read the API key from FILE (keeps it out of the process list)", group=ACCESS,
        metavar="FILE")
    admin_api_key_file: Path | None = option(
        None, "read the admin key from FILE", group=ACCESS, metavar="FILE")
    metrics_need_key: bool = option(False, "require the API key on /metrics too", group=ACCESS)
    allow_unauthenticated: bool = option(
        False, "serve inference without --api-key on an address other than loopback (refused "
               "otherwise)", group=ACCESS)
    allowed_host: tuple[str, ...] = option(
        (), "a Host header name to answer besides loopback names (repeatable; '*' for any). "
            "Default: loopback names only when listening on loopback, any name otherwise",
        group=ACCESS, metavar="NAME")
    routing_location: Literal["auto", "engine", "api"] = option(
        "auto", "where the routing step runs: engine (in vLLM's workers, beside the adapter "
                "banks; Llama-architecture models), api (in this process, handing vLLM prompt "
                "embeddings; any model), or auto: engine where the model allows",
        group=ROUTING)
    max_soft_prompt_length: int = option(
        128, "longest soft prompt (T) on the engine route", group=ROUTING, metavar="T",
        ge=1)
    routing_kernel: Literal["auto", "triton", "torch"] = option(
        "auto", "the routing step's implementation: auto is the fused Triton kernels on CUDA "
                "and batched torch elsewhere", group=ROUTING)
    routing_device: str | None = option(
        None, "api route: device of the adapter bank and routing step (default: cuda if "
              "available, else cpu)", group=ROUTING, metavar="DEVICE")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)


@dataclass(frozen=True)
class EngineSettings:
    model_dir: str
    served_model_name: str
    # The routing step in vLLM's workers (engine/vllm_model.py) rather than in the API process.
    routing_in_engine: bool
    # The longest soft prompt the in-engine route accepts (vLLM sizes its encoder cache by it).
    max_soft_prompt_length: int
    # KV cache size; None leaves it to --gpu-memory-utilization.
    kv_cache_gib: float | None


@dataclass(frozen=True)
class ServerSettings:
    """The options as given, and what start-up made of them."""

    options: ServeOptions
    engine: EngineSettings
    # --adapters, resolved.
    adapters_dir: Path
    routing_device: str
    # vLLM's server options (host, port, engine and serving flags), as its parser made them.
    vllm_args: argparse.Namespace = field(default_factory=argparse.Namespace)
