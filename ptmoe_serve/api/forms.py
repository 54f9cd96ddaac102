"""Multipart uploads (adapter files, training files) read under a size bound: refused from
Content-Length when it declares too much, else as the bytes arrive, before any parsing."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from ptmoe_serve.api.errors import RequestError


async def read_bounded_form(request: Request, limit: int) -> FormData:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)

    async def replay():
        yield bytes(body)

    try:
        return await MultiPartParser(request.headers, replay()).parse()
    except (MultiPartException, AssertionError, ValueError) as e:
        raise RequestError(400, f"the upload is not a valid multipart form: {e}") from None


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the upload is {size} bytes; the limit is {limit} "
                             "(--max-upload-mb)", code="upload_too_large")
