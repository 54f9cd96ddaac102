"""The adapter management API: load, upload, unload, pin and describe adapters while serving,
and page through every adapter the store serves.

Every route needs the admin key (see auth.py). Adapter errors map to 4xx: 400 for an adapter
that fails validation, 403 for a path outside the allowed roots, 404 for an unknown adapter,
409 for a name taken without `replace`, 413 for an upload over the limit; a pin that finds
every slot held is a 503. A store that cannot take the change answers for itself (disk.py):
507 `store_full`, 503 `store_read_only`, `store_busy` or `store_io_error`, and nothing changes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile

from ptmoe_serve.api import protocol
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.adapters.manager import PathNotAllowed
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterExists, AdapterNotFound
from ptmoe_serve.adapters.residency import ResidentSetFull
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.bodies import read_upload_form


router = APIRouter(prefix="/v1/adapters", dependencies=[Depends(require_admin)])
MAX_PAGE = 10_000


@contextmanager
def _adapter_errors(name: str) -> Iterator[None]:
    try:
        yield
    except AdapterExists as e:
        raise RequestError(409, str(e), code="adapter_exists") from None
    except PathNotAllowed as e:
        raise RequestError(403, str(e), code="path_not_allowed", param="path") from None
    except AdapterNotFound:
        raise RequestError(404, f"adapter '{name}' is not loaded", code="adapter_not_found") \
            from None
    except ResidentSetFull as e:
        raise RequestError(503, str(e), code="adapters_busy") from None
    except AdapterError as e:
        raise RequestError(400, str(e), code="invalid_adapter") from None


def _info(entry: AdapterEntry, pinned: set[str], started: float | None = None
          ) -> protocol.AdapterInfo:
    load_ms = 1000 * (time.perf_counter() - started) if started is not None else None
    return protocol.AdapterInfo(**entry.describe(), resident=True, pinned=entry.name in pinned,
                                source=str(entry.source), load_ms=load_ms)


def _described(request: Request, name: str) -> protocol.AdapterInfo:
    """`name` as this server serves it: resident (with its shape and state) or not."""
    manager = request.app.state.services.manager
    entry = manager.registry.find(name)
    if entry is not None:
        return _info(entry, manager.resident.pinned)
    folder = manager.catalog.folder(name)
    if folder is None:
        raise AdapterNotFound(name)
    return protocol.AdapterInfo(name=name, resident=False, source=str(folder))


@router.get("", response_model_exclude_none=True)
async def list_adapters(request: Request, after: str | None = None,
                        limit: int = Query(100, ge=1, le=MAX_PAGE)) -> protocol.AdapterList:
    """A page of the adapters the store serves, in name order (resident or not), and those
    of them that failed to load with the reason: each page bounded, however many fail."""
    manager = request.app.state.services.manager
    names = manager.catalog.page(after, limit + 1)
    return protocol.AdapterList(
        data=[_described(request, name) for name in names[:limit]],
        has_more=len(names) > limit, in_store=len(manager.catalog),
        resident=len(manager.registry), max_resident=manager.resident.capacity,
        failed=[protocol.FailedAdapter(name=name, error=manager.failed[name])
                for name in names[:limit] if name in manager.failed],
        failed_count=len(manager.failed))


@router.get("/{name}", response_model_exclude_none=True)
async def get_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    with _adapter_errors(name):
        return _described(request, name)


@router.post("", response_model_exclude_none=True)
async def load_adapter(body: protocol.LoadAdapterRequest, request: Request) -> protocol.AdapterInfo:
    started = time.perf_counter()
    manager = request.app.state.services.manager
    with _adapter_errors(body.name):
        entry = await manager.load_path(body.name, body.path, body.replace)
    return _info(entry, manager.resident.pinned, started)


@router.put("/{name}", response_model_exclude_none=True)
async def upload_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    services = request.app.state.services
    files = await _read_upload(request, services.settings.options.max_upload_bytes)
    started = time.perf_counter()
    with _adapter_errors(name):
        entry = await services.manager.upload(name, files[CONFIG_FILE], files[WEIGHTS_FILE])
    return _info(entry, services.manager.resident.pinned, started)


@router.delete("/{name}", response_model_exclude_none=True)
async def unload_adapter(name: str, request: Request, purge: bool = False) -> protocol.AdapterInfo:
    """Stop serving `name`, here and on every server over the store; `purge` removes its
    folder from the store too."""
    manager = request.app.state.services.manager
    with _adapter_errors(name):
        info = _described(request, name)
        await manager.unload(name, purge)
    return info.model_copy(update={"resident": False, "pinned": False})


@router.post("/{name}/pin", response_model_exclude_none=True)
async def pin_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    """Make `name` resident, and keep it so: never evicted while pinned (on this server)."""
    manager = request.app.state.services.manager
    started = time.perf_counter()
    with _adapter_errors(name):
        entry = await manager.resident.pin(name)
    return _info(entry, manager.resident.pinned, started)


@router.delete("/{name}/pin", response_model_exclude_none=True)
async def unpin_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    """`name` may be evicted again, when it is the least recently used."""
    manager = request.app.state.services.manager
    with _adapter_errors(name):
        manager.resident.unpin(name)
        return _described(request, name)


async def _read_upload(request: Request, limit: int) -> dict[str, bytes]:
    """The two adapter files of a multipart body, refusing more than `limit` bytes early."""
    form = await read_upload_form(request, limit)
    files = {}
    for field in (CONFIG_FILE, WEIGHTS_FILE):
        part = form.get(field)
        if not isinstance(part, UploadFile):
            raise RequestError(400, f"the upload must hold the files {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} as multipart fields of those names; "
                                    f"{field} is missing", param=field)
        files[field] = await part.read()
    return files
