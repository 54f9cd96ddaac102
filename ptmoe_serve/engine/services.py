"""Builds the project's running parts around vLLM's engine, in order, and stops them: the
adapter registry and store (loaded as they were left), the route and its routing step, the
engine client that vLLM's serving layer calls, the metrics, the store's watcher and the
fine-tuning worker's process."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from vllm.v1.engine.async_llm import AsyncLLM

from ptmoe_serve.adapters.manager import AdapterManager
from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore
from ptmoe_serve.base_model import load_input_embeddings
from ptmoe_serve.config import ServerSettings
from ptmoe_serve.engine.client import AdapterEngineClient
from ptmoe_serve.engine.engine import Engine
from ptmoe_serve.engine.limits import RequestLimits
from ptmoe_serve.engine.route import EngineRoute
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.routing.batcher import SoftPromptBatcher
from ptmoe_serve.routing.route import Route

logger = logging.getLogger(__name__)
# Chat content-part types (their part before "_"), which vLLM matches against adapter names
# to pick a default adapter for multimodal chats: an adapter of such a name would apply to
# base-model chats.
CONTENT_PART_NAMES = frozenset({"text", "thinking", "input", "output", "image", "audio",
                                "video", "prompt", "refusal", "tool", "file"})
# How long the fine-tuning worker may take to finish its training step when the server stops.
WORKER_STOP_SECONDS = 60


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
    # What runs beside the requests: the store's watcher, the api route's routing steps.
    tasks: list[asyncio.Task]
    fine_tune_worker: subprocess.Popen | None = None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.fine_tune_worker is not None:
            # It stops after its step; a job in progress resumes at the next start.
            self.fine_tune_worker.terminate()
            try:
                await asyncio.to_thread(self.fine_tune_worker.wait, WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.fine_tune_worker.kill()
                await asyncio.to_thread(self.fine_tune_worker.wait)


def start_fine_tune_worker(settings: ServerSettings) -> subprocess.Popen:
    """The fine-tuning worker, a process of its own beside the server's (never in the API
    process or vLLM's engine), over the same store; it stops when the server does."""
    threads = [] if settings.fine_tune_threads is None else [
        "--threads", str(settings.fine_tune_threads)]
    return subprocess.Popen([
        sys.executable, "-m", "ptmoe_serve.cli", "fine-tune-worker",
        "--adapters", str(settings.adapters_dir), "--model", settings.engine.model_dir,
        "--served-model-name", settings.engine.served_model_name,
        "--niceness", str(settings.fine_tune_niceness), "--parent-pid", str(os.getpid()),
        *threads])


def release_freed_memory() -> None:
    """Give the C allocator's freed pages back to the system. A bulk load frees gigabytes of
    adapter tensors between the routers it keeps, and glibc holds on to such pages (3,000
    adapters at H=4096: 490 MB kept, 116 MB after this). Nothing to do elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def start_services(settings: ServerSettings, llm: AsyncLLM,
                         metrics_registry: CollectorRegistry) -> Services:
    started = time.time()
    engine = Engine(llm)
    model_dir = Path(settings.engine.model_dir)
    in_engine = settings.engine.routing_in_engine
    # On the engine route the adapters' tensors live in the workers; here the banks only
    # keep the slots (meta tensors take no memory).
    device = torch.device("meta" if in_engine else settings.routing_device)
    registry = AdapterRegistry(
        engine.hidden_size, engine.max_model_len, device,
        reserved_names={settings.engine.served_model_name, *CONTENT_PART_NAMES},
        max_prompt_length=settings.engine.max_soft_prompt_length if in_engine else None)
    metrics = Metrics(metrics_registry, lambda: len(registry),
                      lambda: engine.num_unfinished_requests, lambda: registry.bank_bytes)
    metrics.server.info({"model": settings.engine.served_model_name,
                         "routing": "engine" if in_engine else "api"})
    manager = AdapterManager(registry, AdapterStore(settings.adapters_dir),
                             list(settings.allowed_adapter_roots), on_unload=metrics.forget)
    tasks = []
    route: Route
    if in_engine:
        route = EngineRoute(engine, model_dir)
        manager.on_load = route.preload
        registry.on_bank_dropped = route.drop_bank
        # Into the engine's banks a batch at a time: this process holds one batch's tensors.
        await route.write_all(manager.start_in_batches())
    else:
        fused = {"auto": None, "triton": True, "torch": False}[settings.routing_kernel]
        route = SoftPromptBatcher(load_input_embeddings(model_dir), engine.dtype, device,
                                  on_step=metrics.observe_routing_step, fused=fused)
        tasks.append(asyncio.create_task(route.run()))
        for _ in manager.start_in_batches():  # the banks are this process's: nothing to move
            pass
    registry.drop_empty_banks()  # reserved for folders that then failed their checks
    release_freed_memory()
    limits = RequestLimits(engine.max_model_len, engine.vocab_size, settings.max_sequences,
                           settings.max_logprobs)
    client = AdapterEngineClient(llm, registry, route, metrics,
                                 settings.engine.served_model_name,
                                 routes_prompt_logprobs=in_engine, limits=limits)
    if settings.watch_interval > 0:
        tasks.append(asyncio.create_task(manager.watch(settings.watch_interval)))
    services = Services(settings, engine, registry, manager, route, client, metrics, limits,
                        int(started), tasks)
    if settings.fine_tune_worker:
        services.fine_tune_worker = start_fine_tune_worker(settings)
    logger.info("serving %s with %d adapters (routing %s), ready in %.1f s",
                settings.engine.served_model_name, len(registry),
                "in the engine" if in_engine else "through prompt embeddings",
                time.time() - started)
    return services
