"""GET /v1/models: vLLM's model list, and every adapter a request may name, as vLLM lists every
adapter it knows."""

from __future__ import annotations

from fastapi import Request
from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

from ptmoe_serve.adapters.format import CONFIG_FILE
from ptmoe_serve.engine.services import Services

OWNER = "ptmoe_serve"


async def list_models(request: Request) -> ModelList:
    """vLLM's model list and every adapter a request may name, as vLLM lists every adapter it
    knows: while the store holds at most --max-listed-adapters, all of them; beyond, the
    resident, pinned and newest (GET /v1/adapters pages through the rest). Resident adapters
    come first, with their shape and state under `adapter`; the others say `resident: false`.
    `adapters_in_store` counts them all. An adapter's `root` is its folder only for callers
    who may manage adapters; for the others, its name: the server's file layout is not theirs
    to see."""
    services: Services = request.app.state.services
    manager = services.manager
    base = await request.app.state.openai_serving_models.registry.show_available_models()
    for card in base.data:
        card.owned_by, card.adapter = OWNER, None
    show_paths = request.app.state.access.allows_admin(request)
    names = manager.listed(services.settings.options.max_listed_adapters)
    folders = {name: manager.catalog.folder(name) for name in names
               if manager.registry.find(name) is None}
    created = await manager.store.call(_modified, folders)

    def card(name: str) -> ModelCard:
        entry = manager.registry.find(name)
        source = entry.source if entry is not None else folders.get(name)
        if entry is not None:
            described = {**entry.describe(), "resident": True,
                         "pinned": name in manager.resident.pinned}
        else:
            described = {"name": name, "resident": False, "pinned": False}
        return ModelCard(id=name, owned_by=OWNER,
                         created=int(entry.loaded_at) if entry else created.get(name, 0),
                         root=str(source) if show_paths and source else name,
                         parent=base.data[0].id, max_model_len=services.engine.max_model_len,
                         adapter=described)

    base.data += [card(name) for name in names]
    base.adapters_in_store = len(manager.catalog)
    return base


def _modified(folders: dict) -> dict[str, int]:
    """When each folder's adapter was written (a stat each, on the store's threads)."""
    times = {}
    for name, folder in folders.items():
        try:
            times[name] = int((folder / CONFIG_FILE).stat().st_mtime)
        except (OSError, TypeError):
            continue
    return times

