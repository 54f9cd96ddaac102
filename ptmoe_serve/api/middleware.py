"""What every request passes through before vLLM's routes, outermost first: its keys and Host
name; its body, read once under its size limit; its adapter made resident and held; and the
headers added to its response (Retry-After on a 503, the adapter's version)."""

from __future__ import annotations

import json
import time

from fastapi import Request
from starlette.datastructures import Headers

from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.registry import AdapterNotFound
from ptmoe_serve.adapters.residency import ResidentSet, ResidentSetFull
from ptmoe_serve.api import files, fine_tuning, management, vllm_lora
from ptmoe_serve.api.auth import AccessPolicy
from ptmoe_serve.api.bodies import BodyLimit, read_body
from ptmoe_serve.api.errors import RETRY_AFTER_SECONDS, RequestError, store_error_response
from ptmoe_serve.disk import StoreError
from ptmoe_serve.engine.client import COLD_START, REQUEST_HOLD, SERVED_VERSIONS

# Probes that answer without a key (and /metrics unless --metrics-need-key).
OPEN_PATHS = frozenset({"/health", "/ping"})
# A management call's JSON (load, replace) is a name and a path.
MANAGEMENT_BODY_LIMIT = BodyLimit(64 * 1024, "management calls")
# Names the store's version of the adapter a response was generated with.
ADAPTER_VERSION_HEADER = b"ptmoe-adapter-version"
# Where the body-limit middleware leaves the body it read, for the residency middleware.
BODY = "ptmoe.body"


class AccessMiddleware:
    """The Host header on every route; the API key on every route but the open probes;
    management routes check the admin key themselves."""

    def __init__(self, app, access: AccessPolicy):
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            self.access.check_host(request)
            if not self._open(scope["path"]):
                self.access.check_api(request)
        except RequestError as e:
            return await e.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or (path == "/metrics" or path.startswith("/metrics/")) \
            and not self.access.metrics_need_key


class BodyLimitMiddleware:
    """Bodies over their limit get a 413 before anything parses them (bodies.py). Management
    calls are small JSON; uploads are bounded by their own handlers (--max-upload-mb);
    everything else by --max-request-mb. The body read is kept in the scope (BODY) and replayed
    to the app."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = BodyLimit(limit, "--max-request-mb")

    def _limit(self, scope) -> BodyLimit | None:
        if scope["path"].startswith(management.router.prefix):
            return None if scope["method"] == "PUT" else MANAGEMENT_BODY_LIMIT
        if scope["path"] in (vllm_lora.LOAD_PATH, vllm_lora.UNLOAD_PATH):
            return MANAGEMENT_BODY_LIMIT
        if scope["path"] == files.router.prefix and scope["method"] == "POST":
            return None  # an upload: bounded by its handler (--max-upload-mb)
        return self.limit

    async def __call__(self, scope, receive, send):
        bound = self._limit(scope) if scope["type"] == "http" else None
        if bound is None:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(receive, Headers(scope=scope), bound)
        except RequestError as e:
            return await e.response()(scope, receive, send)
        if body is None:
            return  # the client left before sending its body
        scope[BODY] = body
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: vLLM watches for disconnects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class ResidencyMiddleware:
    """A request naming an adapter the store serves gets it resident before vLLM sees the
    request, and holds it until the response has ended, streamed or not: a first request waits
    for the load (milliseconds), one whose adapter cannot be read gets a 400 naming the
    problem, and one that finds every slot held longer than --adapter-wait-seconds a 503 with
    Retry-After, all before any stream starts. Requests for resident adapters only take a hold,
    which the engine requests the request starts share (engine/client.py).
    The project's own management, files and fine-tuning routes pass by."""

    PASSING = (management.router.prefix, files.router.prefix, fine_tuning.router.prefix,
               vllm_lora.LOAD_PATH, vllm_lora.UNLOAD_PATH)

    def __init__(self, app, resident: ResidentSet, catalog):
        self.app = app
        self.catalog = catalog
        self.resident = resident

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"].startswith(self.PASSING)):
            return await self.app(scope, receive, send)
        name = _model_of(scope.get(BODY))
        if name not in self.catalog:  # the base model, or not an adapter: vLLM answers
            return await self.app(scope, receive, send)
        arrived = time.perf_counter()
        cold = self.resident.registry.find(name) is None
        try:
            hold = await self.resident.hold(name)
        except ResidentSetFull as e:
            response = RequestError(503, str(e), code="adapters_busy").response()
            response.headers["retry-after"] = RETRY_AFTER_SECONDS
            return await response(scope, receive, send)
        except AdapterNotFound:  # went from the store meanwhile: vLLM's 404
            return await self.app(scope, receive, send)
        except StoreError as e:  # its first version could not be recorded: try again later
            return await store_error_response(e)(scope, receive, send)
        except AdapterError as e:
            return await RequestError(400, f"adapter '{name}' cannot be loaded: {e}",
                                      code="invalid_adapter", param="model"
                                      ).response()(scope, receive, send)
        if cold:
            COLD_START.set(arrived)
        REQUEST_HOLD.set(hold)
        try:
            return await self.app(scope, receive, send)
        finally:
            hold.leave()


def _model_of(body: bytes | None) -> str | None:
    """The `model` a JSON request body names, if it names one."""
    if body is None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


class ResponseHeadersMiddleware:
    """Headers every response may need. A 503 says when to try again, as clients and load
    balancers expect (vLLM answers 503 at its queue limits, --max-num-queued-reqs and
    --max-num-queued-tokens, without one). A response generated with an adapter names the
    adapter's version (the store's, the same on every replica): which content answered, when a
    replace raced the request. The version is known before a stream starts: the engine client
    resolves the adapter when vLLM calls `generate`, before the first byte."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: set[int] = set()
        SERVED_VERSIONS.set(served)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if message["status"] == 503 and not any(
                        name.lower() == b"retry-after" for name, _ in headers):
                    headers.append((b"retry-after", RETRY_AFTER_SECONDS.encode()))
                if served:
                    headers.append((ADAPTER_VERSION_HEADER,
                                    ",".join(map(str, sorted(served))).encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_headers)
