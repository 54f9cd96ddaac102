"""Builds the running parts from the settings, in order, and stops them: the engine, the
tokenizer, the adapter registry (loaded from the adapters folder), the routing step and the
serving logic. The HTTP layer holds one `Services` and nothing else."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ptmoe_serve import protocol
from ptmoe_serve.adapter import AdapterError, read_adapter
from ptmoe_serve.engine import Engine
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.registry import AdapterRegistry
from ptmoe_serve.serving import Serving
from ptmoe_serve.settings import ServerSettings
from ptmoe_serve.soft_prompts import SoftPromptBatcher, load_input_embeddings

logger = logging.getLogger(__name__)
OWNER = "ptmoe_serve"


@dataclass
class Services:
    settings: ServerSettings
    engine: Engine
    registry: AdapterRegistry
    batcher: SoftPromptBatcher
    serving: Serving
    metrics: Metrics
    started_at: int

    def model_list(self) -> protocol.ModelList:
        base = self.serving.base_model_name
        cards = [protocol.ModelCard(id=base, created=self.started_at, owned_by=OWNER,
                                    root=self.settings.engine.model_dir,
                                    max_model_len=self.engine.max_model_len)]
        for entry in self.registry.entries():
            cards.append(protocol.ModelCard(
                id=entry.name, created=int(entry.loaded_at), owned_by=OWNER,
                root=str(entry.source or entry.name), parent=base,
                max_model_len=self.engine.max_model_len, adapter=entry.describe()))
        return protocol.ModelList(data=cards)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.engine.shutdown()


def load_adapters_dir(registry: AdapterRegistry, folder: Path) -> None:
    """Load every adapter folder found; a bad one is logged and skipped, not fatal."""
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            registry.add(path.name, read_adapter(path), source=path)
        except AdapterError as e:
            logger.error("adapter %s not loaded: %s", path.name, e)


async def start_services(settings: ServerSettings) -> Services:
    started = time.time()
    engine = Engine(settings.engine)
    model_dir = Path(settings.engine.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device(settings.routing_device)
    registry = AdapterRegistry(engine.hidden_size, engine.max_model_len, device,
                               reserved_names={settings.engine.served_model_name})
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    load_adapters_dir(registry, settings.adapters_dir)
    metrics = Metrics()
    batcher = SoftPromptBatcher(registry, load_input_embeddings(model_dir), engine.dtype,
                                on_step=metrics.observe_routing_step)
    batcher.start()
    serving = Serving(engine, registry, batcher, tokenizer, metrics,
                      settings.engine.served_model_name)
    logger.info("serving %s with %d adapters, ready in %.1f s",
                settings.engine.served_model_name, len(registry), time.time() - started)
    return Services(settings, engine, registry, batcher, serving, metrics, int(started))
