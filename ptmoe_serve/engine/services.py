"""Builds the project's running parts around vLLM's engine, in order, and stops them: the
adapter registry and store (loaded as they were left), the route and its routing step, the
engine client that vLLM's serving layer calls, the metrics, the store's watcher and the
fine-tuning worker's process (supervised: started again when it dies)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from vllm.v1.engine.async_llm import AsyncLLM

from ptmoe_serve.adapters.bank import BankShape
from ptmoe_serve.adapters.manager import AdapterManager, ResidencyLimits
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore
from ptmoe_serve.base_model import load_input_embeddings
from ptmoe_serve.config import ServerSettings
from ptmoe_serve.engine.client import AdapterEngineClient
from ptmoe_serve.engine.engine import Engine
from ptmoe_serve.engine.limits import RequestLimits
from ptmoe_serve.engine.lora_stats import track_adapter_requests
from ptmoe_serve.engine.engine_route import EngineRoute
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.routing.api_route import ApiRoute
from ptmoe_serve.routing.route import Route
from ptmoe_serve.train.supervisor import WorkerSupervisor

logger = logging.getLogger(__name__)
# Chat content-part types (their part before "_"), which vLLM matches against adapter names
# to pick a default adapter for multimodal chats: an adapter of such a name would apply to
# base-model chats.
CONTENT_PART_NAMES = frozenset({"text", "thinking", "input", "output", "image", "audio",
                                "video", "prompt", "refusal", "tool", "file"})
# The adapter banks' memory where there is no GPU: about 10,800 adapters of the paper's shape at
# H=576, 1,700 at H=4096.
CPU_BANK_BUDGET = 1 << 30


@dataclass
class Services:
    settings: ServerSettings
    engine: Engine
    registry: AdapterRegistry
    manager: AdapterManager
    route: Route
    client: AdapterEngineClient
    metrics: Metrics
    limits: RequestLimits
    started_at: int
    # What runs beside the requests: the store's watcher.
    tasks: list[asyncio.Task]
    fine_tune_worker: WorkerSupervisor | None = None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.fine_tune_worker is not None:
            await self.fine_tune_worker.stop()


def fine_tune_worker_command(settings: ServerSettings) -> list[str]:
    """The fine-tuning worker, a process of its own beside the server's (never in the API
    process or vLLM's engine), over the same store; it stops when the server does."""
    options = settings.options
    threads = [] if options.fine_tune_threads is None else [
        "--threads", str(options.fine_tune_threads)]
    return [sys.executable, "-m", "ptmoe_serve.cli", "fine-tune-worker",
            "--adapters", str(settings.adapters_dir), "--model", settings.engine.model_dir,
            "--served-model-name", settings.engine.served_model_name,
            "--niceness", str(options.fine_tune_niceness), "--parent-pid", str(os.getpid()),
            *threads]


def default_capacity(hidden_size: int, budget_bytes: int) -> int:
    """How many adapters of the paper's shape (N=2, T=40, R=36) at this hidden size fit the
    banks' memory budget (--max-resident-adapters' default)."""
    return max(1, budget_bytes // BankShape(2, 40, 36).bytes_per_slot(hidden_size))


def bank_budget(settings: ServerSettings) -> int:
    """The banks' memory: on a GPU, half of what vLLM leaves of the device
    (1 - --gpu-memory-utilization); elsewhere CPU_BANK_BUDGET."""
    if not torch.cuda.is_available():
        return CPU_BANK_BUDGET
    utilization = getattr(settings.vllm_args, "gpu_memory_utilization", 0.9)
    return int(torch.cuda.get_device_properties(0).total_memory * (1 - utilization) / 2)


async def start_services(settings: ServerSettings, llm: AsyncLLM,
                         metrics_registry: CollectorRegistry) -> Services:
    started = time.time()
    options = settings.options
    engine = Engine(llm)
    model_dir = Path(settings.engine.model_dir)
    in_engine = settings.engine.routing_in_engine
    # On the engine route the adapters' tensors live in the workers; here the banks only
    # keep the slots (meta tensors take no memory).
    device = torch.device("meta" if in_engine else settings.routing_device)
    capacity = options.max_resident_adapters or default_capacity(engine.hidden_size,
                                                                  bank_budget(settings))
    limits = ResidencyLimits(capacity, capacity if options.max_cpu_adapters is None
                             else options.max_cpu_adapters, options.adapter_wait_seconds)
    metrics = Metrics(metrics_registry, lambda: len(registry), lambda: len(manager.catalog),
                      lambda: engine.num_unfinished_requests, lambda: registry.bank_bytes)
    metrics.server.info({"model": settings.engine.served_model_name,
                         "routing": "engine" if in_engine else "api",
                         "max_resident_adapters": str(capacity)})
    route: Route
    if in_engine:
        route = EngineRoute(engine, model_dir)
    else:
        fused = {"auto": None, "triton": True, "torch": False}[options.routing_kernel]
        route = ApiRoute(load_input_embeddings(model_dir), engine.dtype, device,
                         on_step=metrics.observe_routing_step, fused=fused)
    registry = AdapterRegistry(
        engine.hidden_size, engine.max_model_len, device,
        reserved_names={settings.engine.served_model_name, *CONTENT_PART_NAMES},
        max_prompt_length=settings.engine.max_soft_prompt_length if in_engine else None,
        on_bank_dropped=route.drop_bank)
    store = AdapterStore(settings.adapters_dir, options.store_lock_timeout)
    manager = AdapterManager(registry, store, list(options.allow_adapter_path), limits,
                             on_unload=metrics.forget, observer=metrics.residency_observer(),
                             on_resident=route.preload)
    metrics.watch_residency(manager.resident, metrics_registry)
    metrics.watch_store(lambda: store.writable, metrics_registry)
    manager.start()
    for name in options.pin:
        try:
            await manager.resident.pin(name)
        except Exception as e:
            raise RuntimeError(f"--pin {name}: {'not in the store' if isinstance(e, KeyError) else e}"
                               ) from None
    request_limits = RequestLimits(engine.max_model_len, engine.vocab_size,
                                   options.max_sequences_per_request,
                                   options.max_logprobs_per_request)
    client = AdapterEngineClient(llm, registry, manager.catalog, route, metrics,
                                 settings.engine.served_model_name,
                                 routes_prompt_logprobs=in_engine, limits=request_limits)
    track_adapter_requests(llm, client.request_names, capacity, metrics_registry)
    tasks = ([asyncio.create_task(manager.watch(options.watch_interval))]
             if options.watch_interval > 0 else [])
    services = Services(settings, engine, registry, manager, route, client, metrics,
                        request_limits, int(started), tasks)
    if options.fine_tune_worker and store.read_only:
        logger.info("no fine-tuning worker: the adapter store is read-only")
    elif options.fine_tune_worker:
        services.fine_tune_worker = WorkerSupervisor(
            fine_tune_worker_command(settings), on_restart=metrics.fine_tune_worker_restarts.inc)
        services.fine_tune_worker.start()
    logger.info("serving %s with %d adapters in the store, %d resident of at most %d "
                "(routing %s), ready in %.2f s", settings.engine.served_model_name,
                len(manager.catalog), len(registry), capacity,
                "in the engine" if in_engine else "through prompt embeddings",
                time.time() - started)
    return services
