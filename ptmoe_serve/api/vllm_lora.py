"""vLLM's runtime LoRA endpoints, as the tools that place adapters on vLLM replicas call them
(AIBrix's ModelAdapter controller, NVIDIA Dynamo): `POST /v1/load_lora_adapter`
(`{"lora_name", "lora_path", "load_inplace"}`) and `POST /v1/unload_lora_adapter`
(`{"lora_name"}`), with vLLM's bodies, answers (a line of text on success) and errors (vLLM's
shape and status codes), mapped onto the adapter store.

- load: a PT-MoE adapter folder under an allowed root is served as `lora_name` from where it
  lies (as POST /v1/adapters does); a PEFT prompt-tuning checkpoint is converted and written
  into the store (as `ptmoe-serve convert-peft` and an upload do). Either way the adapter is
  made resident on this server and pinned: the replica a controller placed it on keeps it. A
  name the store serves already, from the same folder or with the same converted content, is
  made resident and pinned (200): over a shared store, another replica loaded it first, and
  that replica's `/v1/models` is what the controller checked. Another adapter under that name
  is vLLM's 400 unless `load_inplace`, which replaces it.
- unload: the store stops serving the name (DELETE /v1/adapters/{name}), on every server over
  the store, as it would on a vLLM server of its own.

A PEFT LoRA folder is refused with a 400 that says what this server serves. Both routes need
the admin key, and the management API's bounds apply (allowed roots, body size, resident cap)."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.create import convert_prompt_tuning
from ptmoe_serve.adapters.format import (CONFIG_FILE, MAX_WEIGHTS_BYTES, WEIGHTS_FILE,
                                         adapter_files, read_config_object)
from ptmoe_serve.adapters.manager import AdapterManager, FolderNotFound, PathNotAllowed
from ptmoe_serve.adapters.registry import AdapterNotFound
from ptmoe_serve.adapters.residency import ResidentSetFull
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.disk import StoreError

LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
router = APIRouter(dependencies=[Depends(require_admin), Depends(validate_json_request)])


class _Refused(Exception):
    def __init__(self, message: str, err_type: str = "InvalidUserInput",
                 status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.response = JSONResponse(
            create_error_response(message, err_type, status).model_dump(), status_code=status)


@router.post(LOAD_PATH)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    name = body.lora_name
    try:
        if not name or not body.lora_path:
            raise _Refused("Both 'lora_name' and 'lora_path' must be provided.")
        if request.app.state.openai_serving_models.is_base_model(name):
            raise _Refused(f"The lora adapter '{name}' conflicts with a served base model.")
        manager: AdapterManager = request.app.state.services.manager
        await _serve(manager, name, body.lora_path, body.load_inplace)
        await manager.resident.pin(name)
    except _Refused as e:
        return e.response
    except PathNotAllowed as e:
        return _Refused(str(e), "PermissionDeniedError", HTTPStatus.FORBIDDEN).response
    except (FolderNotFound, AdapterNotFound):
        return _Refused(f"Loading lora {name} failed: No adapter found for {body.lora_path}",
                        "NotFoundError", HTTPStatus.NOT_FOUND).response
    except ResidentSetFull as e:
        return _Refused(str(e), "ServiceUnavailableError",
                        HTTPStatus.SERVICE_UNAVAILABLE).response
    except StoreError as e:
        return _store_refused(e).response
    except AdapterError as e:  # a reserved name (AdapterExists) too
        return _Refused(f"adapter '{name}' cannot be loaded from {body.lora_path}: {e}").response
    return Response(status_code=200, content=f"Success: LoRA adapter '{name}' added successfully.")


@router.post(UNLOAD_PATH)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    name = body.lora_name
    if not name:
        return _Refused("'lora_name' needs to be provided to unload a LoRA adapter.").response
    manager: AdapterManager = request.app.state.services.manager
    try:
        await manager.unload(name, purge=False)
    except AdapterNotFound:
        return _Refused(f"The lora adapter '{name}' cannot be found.", "NotFoundError",
                        HTTPStatus.NOT_FOUND).response
    except StoreError as e:
        return _store_refused(e).response
    return Response(status_code=200,
                    content=f"Success: LoRA adapter '{name}' removed successfully.")


def _store_refused(error: StoreError) -> _Refused:
    """vLLM's error shape, with the store's status (507 full, 503 read-only or busy)."""
    refused = _Refused(str(error), "ServiceUnavailableError"
                       if error.status == 503 else "InsufficientStorageError",
                       HTTPStatus(error.status))
    if error.status == 503:
        refused.response.headers["retry-after"] = "1"
    return refused


async def _serve(manager: AdapterManager, name: str, path: str, replace: bool) -> None:
    """Have the store serve `path`'s adapter as `name`, unless it does already."""
    folder = await manager.store.call(manager.allowed_folder, path)
    kind = await manager.store.call(_peft_type, folder)
    if kind == "PT_MOE":
        if replace or manager.catalog.folder(name) != folder:
            _check_free(manager, name, replace)
            await manager.load_path(name, str(folder), replace)
        return
    if kind != "PROMPT_TUNING":
        raise _Refused(f"{path} holds a PEFT {kind} adapter; this server serves PT-MoE "
                       "adapters and PEFT prompt tuning (PROMPT_TUNING), whose soft prompts it "
                       "puts before the input: it runs no LoRA weights")
    weights_file = folder / WEIGHTS_FILE
    if weights_file.is_file() and weights_file.stat().st_size > MAX_WEIGHTS_BYTES:
        raise AdapterError(f"{WEIGHTS_FILE} is over {MAX_WEIGHTS_BYTES} bytes")
    config, weights = adapter_files(await asyncio.to_thread(convert_prompt_tuning, folder))
    if replace or not await manager.store.call(_stored_as, manager, name, config, weights):
        _check_free(manager, name, replace)
        await manager.upload(name, config, weights)


def _peft_type(folder: Path) -> str:
    kind = read_config_object(folder).get("peft_type")
    if not isinstance(kind, str):
        raise AdapterError(f"{CONFIG_FILE} names no peft_type")
    return kind


def _check_free(manager: AdapterManager, name: str, replace: bool) -> None:
    if not replace and name in manager.catalog:
        raise _Refused(f"The lora adapter '{name}' has already been loaded. If you want to load "
                       "the adapter in place, set 'load_inplace' to True.")


def _stored_as(manager: AdapterManager, name: str, config: bytes, weights: bytes) -> bool:
    """Whether the store serves `name` with exactly these files."""
    folder = manager.catalog.folder(name)
    if folder is None:
        return False
    try:
        return ((folder / CONFIG_FILE).read_bytes() == config
                and (folder / WEIGHTS_FILE).read_bytes() == weights)
    except OSError:
        return False

