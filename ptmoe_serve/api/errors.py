"""Errors of the project's own routes (access, adapter management, routing), in OpenAI's
shape: `{"error": {"message", "type", "param", "code"}}`. vLLM's routes answer their own."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from ptmoe_serve.disk import StoreError

ERROR_TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
               409: "ConflictError", 413: "RequestTooLargeError",
               503: "ServiceUnavailableError", 507: "InsufficientStorageError"}
RETRY_AFTER_SECONDS = "1"


class RequestError(Exception):
    """A request the server refuses; maps to an OpenAI error response."""

    def __init__(self, status: int, message: str, code: str = "invalid_value",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "BadRequestError")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


async def request_error_handler(request: Request, error: RequestError) -> JSONResponse:
    return error.response()


def store_error_response(error: StoreError) -> JSONResponse:
    """A change the store could not make: 507 when it is full, 503 (try again) otherwise."""
    response = RequestError(error.status, str(error), code=error.code).response()
    if error.status == 503:
        response.headers["retry-after"] = RETRY_AFTER_SECONDS
    return response


async def store_error_handler(request: Request, error: StoreError) -> JSONResponse:
    return store_error_response(error)
