"""The adapter management API: load, upload, unload and describe adapters while serving.

Every route needs the admin key (see auth.py). Adapter errors map to 4xx: 400 for an adapter
that fails validation, 403 for a path outside the allowed roots, 404 for an unknown adapter,
409 for a name taken without `replace`, 413 for an upload over the limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from ptmoe_serve.api import protocol
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.adapters.manager import PathNotAllowed
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterExists, AdapterNotFound
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.bodies import read_upload_form


router = APIRouter(prefix="/v1/adapters", dependencies=[Depends(require_admin)])


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
    except AdapterError as e:
        raise RequestError(400, str(e), code="invalid_adapter") from None


def _info(entry: AdapterEntry, started: float | None = None) -> protocol.AdapterInfo:
    load_ms = 1000 * (time.perf_counter() - started) if started is not None else None
    return protocol.AdapterInfo(**entry.describe(), source=str(entry.source), load_ms=load_ms)


@router.get("")
async def list_adapters(request: Request) -> protocol.AdapterList:
    """The adapters loaded, and the folders that failed to load with the reason."""
    services = request.app.state.services
    return protocol.AdapterList(
        data=[_info(e) for e in services.registry.entries()],
        failed=[protocol.FailedAdapter(name=name, error=error)
                for name, error in sorted(services.manager.failed.items())])


@router.get("/{name}")
async def get_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    with _adapter_errors(name):
        return _info(request.app.state.services.registry.get(name))


@router.post("")
async def load_adapter(body: protocol.LoadAdapterRequest, request: Request) -> protocol.AdapterInfo:
    started = time.perf_counter()
    with _adapter_errors(body.name):
        entry = request.app.state.services.manager.load_path(body.name, body.path, body.replace)
    return _info(entry, started)


@router.put("/{name}")
async def upload_adapter(name: str, request: Request) -> protocol.AdapterInfo:
    services = request.app.state.services
    files = await _read_upload(request, services.settings.max_upload_bytes)
    started = time.perf_counter()
    with _adapter_errors(name):
        entry = await services.manager.upload(name, files[CONFIG_FILE], files[WEIGHTS_FILE])
    return _info(entry, started)


@router.delete("/{name}")
async def unload_adapter(name: str, request: Request, purge: bool = False) -> protocol.AdapterInfo:
    with _adapter_errors(name):
        return _info(request.app.state.services.manager.unload(name, purge))


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
