"""OpenAI's files API for fine-tuning: upload, list, retrieve, download and delete the JSONL
files that fine-tuning jobs train on (`client.files.*` of the `openai` package works as it is).
Every route needs the admin key; an upload is bounded like an adapter upload
(--max-upload-mb) and checked for being JSONL before it is kept."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.bodies import read_upload_form
from ptmoe_serve.api.paging import list_page
from ptmoe_serve.train.files import PURPOSE, FileError, FileNotFound, TrainingFiles

router = APIRouter(prefix="/v1/files", dependencies=[Depends(require_admin)])
MAX_LIST_LIMIT = 10_000


def _files(request: Request) -> TrainingFiles:
    return request.app.state.files


def _not_found(file_id: str) -> RequestError:
    return RequestError(404, f"No such File object: {file_id}", code="file_not_found",
                        param="file_id")


async def _in_store(request: Request, work, *args):
    """`work(*args)` on the store's threads (never the event loop), a missing file a 404."""
    try:
        return await request.app.state.services.manager.store.call(work, *args)
    except FileNotFound as e:
        raise _not_found(e.args[0]) from None


@router.post("")
async def upload_file(request: Request) -> dict:
    services = request.app.state.services
    form = await read_upload_form(request, services.settings.options.max_upload_bytes)
    part, purpose = form.get("file"), form.get("purpose")
    if not isinstance(part, UploadFile):
        raise RequestError(400, "the upload must hold the file as the multipart field 'file'",
                           param="file")
    if not isinstance(purpose, str):
        raise RequestError(400, "the upload must say its purpose ('fine-tune') as the "
                                "multipart field 'purpose'", param="purpose")
    data = await part.read()
    try:  # a check of every line, and the writes
        record = await _in_store(request, _files(request).add, part.filename or "", purpose,
                                 data)
    except FileError as e:
        raise RequestError(400, str(e), param="file") from None
    return record.describe()


@router.get("")
async def list_files(request: Request, purpose: str | None = None,
                     limit: int = Query(MAX_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT),
                     after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict:
    """OpenAI's cursor pages: `limit` files after the file `after`, newest first unless
    `order` is asc; a page's records are the only ones read."""
    if purpose not in (None, PURPOSE):  # the one purpose kept
        return list_page([], False)
    files, more = await _in_store(request, _files(request).page, after, limit, order == "desc")
    return list_page([f.describe() for f in files], more)


@router.get("/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict:
    return (await _in_store(request, _files(request).get, file_id)).describe()


@router.get("/{file_id}/content")
async def file_content(file_id: str, request: Request) -> FileResponse:
    files = _files(request)
    record = await _in_store(request, files.get, file_id)
    return FileResponse(files.content_path(record.id), media_type="application/jsonl",
                        filename=record.filename)


@router.delete("/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    await _in_store(request, _files(request).delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
