"""Request bodies read under a size bound, before anything parses them: refused from
Content-Length when it declares too much, else as the bytes arrive, never holding more than the
bound. The body-size middleware (server.py) reads inference and management calls through it;
the upload routes (adapters, training files) read their multipart forms through it."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import Receive

from ptmoe_serve.api.errors import RequestError


@dataclass(frozen=True)
class BodyLimit:
    limit: int  # bytes
    option: str  # what sets it, for the message
    what: str = "the request body"
    code: str = "request_too_large"

    def refusal(self, size: str) -> RequestError:
        return RequestError(413, f"{self.what} is {size}; the limit is {self.limit} bytes "
                                 f"({self.option})", code=self.code)


async def read_body(receive: Receive, headers: Headers, bound: BodyLimit) -> bytes | None:
    """The whole body, or a 413 (RequestError) as soon as it is known to be over the bound;
    None if the client left before sending it all."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > bound.limit):
        raise bound.refusal(f"{declared} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > bound.limit:
            raise bound.refusal(f"over {bound.limit} bytes")
        if not message.get("more_body"):
            return bytes(body)


async def read_upload_form(request: Request, limit: int) -> FormData:
    """A multipart upload within --max-upload-mb, parsed."""
    bound = BodyLimit(limit, "--max-upload-mb", what="the upload", code="upload_too_large")
    body = await read_body(request.receive, request.headers, bound)
    if body is None:
        raise RequestError(400, "the client closed the connection before the upload ended")

    async def replay():
        yield body

    try:
        return await MultiPartParser(request.headers, replay()).parse()
    except (MultiPartException, AssertionError, ValueError) as e:
        raise RequestError(400, f"the upload is not a valid multipart form: {e}") from None
