"""The HTTP server: vLLM's own OpenAI application, built by vLLM's launcher functions over the
adapter-aware engine client (engine/client.py), with the project's routes added: adapter
management (its own, and vLLM's runtime LoRA endpoints over it), adapter cards in /v1/models,
a prompt's routing, and API keys on every route but the health and metrics probes.

Every OpenAI and vLLM endpoint, field, error and metric is vLLM's; an adapter's name is one
more model name to it."""

from __future__ import annotations

import functools
import json
import logging
import time

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import (
    build_async_engine_client_from_engine_args)
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelList
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.tokenize.protocol import (TokenizeChatRequest,
                                                      TokenizeCompletionRequest)
from vllm.exceptions import VLLMValidationError
from vllm.v1.metrics.prometheus import get_prometheus_registry

from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE
from ptmoe_serve.adapters.registry import AdapterNotFound
from ptmoe_serve.adapters.residency import ResidentSetFull
from ptmoe_serve.api import files, fine_tuning, management, vllm_lora
from ptmoe_serve.api.auth import AccessPolicy
from ptmoe_serve.api.bodies import BodyLimit, read_body
from ptmoe_serve.api.errors import (RETRY_AFTER_SECONDS, RequestError, request_error_handler,
                                    store_error_handler, store_error_response)
from ptmoe_serve.api.protocol import PromptRouting, RoutingRequest, RoutingResponse
from ptmoe_serve.config import ServerSettings
from ptmoe_serve.disk import StoreError
from ptmoe_serve.engine.client import COLD_START, SERVED_VERSIONS
from ptmoe_serve.engine.engine import engine_args
from ptmoe_serve.engine.limits import RequestLimits, prompt_count
from ptmoe_serve.engine.services import Services, start_services
from ptmoe_serve.train.files import TrainingFiles
from ptmoe_serve.train.jobs import FineTuningJobs

logger = logging.getLogger(__name__)
OWNER = "ptmoe_serve"
# Probes that answer without a key (and /metrics unless --metrics-need-key).
OPEN_PATHS = frozenset({"/health", "/ping"})
# A management call's JSON (load, replace) is a name and a path.
MANAGEMENT_BODY_LIMIT = BodyLimit(64 * 1024, "management calls")
# Names the store's version of the adapter a response was generated with.
ADAPTER_VERSION_HEADER = b"ptmoe-adapter-version"


async def run(settings: ServerSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain for vLLM's --shutdown-timeout."""
    args = settings.vllm_args
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client_from_engine_args(
            engine_args(settings.engine, args)) as llm:
        services = await start_services(settings, llm, get_prometheus_registry())
        try:
            tasks = await llm.get_supported_tasks()
            app = build_app(args, tasks, llm.model_config)
            await init_app_state(services.client, app.state, args, tasks)
            add_project_routes(app, services)
            logger.info("ptmoe_serve on %s", listen_address)
            shutdown = await serve_http(
                app, sock=sock, host=args.host, port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count)
        finally:
            await services.stop()
    try:
        await shutdown
    finally:
        sock.close()


def add_project_routes(app: FastAPI, services: Services) -> None:
    state = app.state
    state.services = services
    settings = services.settings
    state.access = AccessPolicy(settings.admin_api_key, settings.api_key,
                                settings.metrics_need_key, settings.allowed_hosts)
    # Fine-tuning's files and jobs live in the store, for every server and worker over it.
    state.files = TrainingFiles(settings.adapters_dir)
    state.jobs = FineTuningJobs(settings.adapters_dir, settings.store_lock_timeout)
    # vLLM's serving layer resolves model names through this table: adapters are in it.
    state.openai_serving_models.lora_requests = services.client.names
    for serving in state._state.values():
        if not isinstance(serving, BaseServing):
            continue
        if hasattr(serving, "beam_search"):
            serving.beam_search = _without_adapters(serving.beam_search)
        if hasattr(serving, "create_completion"):
            serving.create_completion = _sequences_bounded(serving.create_completion,
                                                           services.limits)
        # vLLM picks a "default multimodal adapter" by matching chat content-part types
        # against every adapter's name, for each base-model chat: with content-part names
        # reserved it never finds one, so skip the walk over 100,000 adapters.
        serving._get_active_default_mm_loras = lambda request: None
    _replace_route(app, "/v1/models", "GET", _models)
    app.add_api_route("/v1/routing", _routing, methods=["POST"],
                      response_model=RoutingResponse)
    app.include_router(management.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    # vLLM's own (VLLM_ALLOW_RUNTIME_LORA_UPDATING) would hand the engine a LoRA: these first.
    app.router.routes[:] = [route for route in app.router.routes if getattr(
        route, "path", None) not in (vllm_lora.LOAD_PATH, vllm_lora.UNLOAD_PATH)]
    app.include_router(vllm_lora.router)
    app.add_exception_handler(RequestError, request_error_handler)
    app.add_exception_handler(StoreError, store_error_handler)
    # Outermost: a request without a valid key is refused before its body is read; next, one
    # whose body is over its limit, before it is parsed. vLLM's app has built its middleware
    # stack already: built again, as vLLM's launcher does.
    app.user_middleware.insert(0, Middleware(_AccessMiddleware, access=state.access))
    app.user_middleware.insert(1, Middleware(_BodyLimitMiddleware,
                                             limit=services.settings.max_request_bytes))
    app.user_middleware.insert(2, Middleware(_ResidencyMiddleware, services=services))
    app.user_middleware.insert(3, Middleware(_RetryAfterMiddleware))
    app.user_middleware.insert(4, Middleware(_AdapterVersionMiddleware))
    app.middleware_stack = app.build_middleware_stack()


def _without_adapters(beam_search):
    """Beam search renders each step's beams as new prompts, which would route anew at every
    step: refused for adapters, served for the base model."""

    @functools.wraps(beam_search)
    def guarded(prompt, request_id, params, lora_request=None, **kwargs):
        if lora_request is not None:
            raise VLLMValidationError(
                f"beam search is not supported with adapter '{lora_request.lora_name}': an "
                "adapter routes once per prompt, and beam search would route every step's "
                "beams anew; use sampling or greedy decoding", parameter="use_beam_search")
        return beam_search(prompt, request_id, params, lora_request=lora_request, **kwargs)

    return guarded


def _sequences_bounded(create_completion, limits: RequestLimits):
    """Prompts x n bounded per request, before vLLM renders a prompt (each engine request is
    bounded on its own in the engine client)."""

    @functools.wraps(create_completion)
    async def bounded(request, raw_request=None):
        try:
            limits.check_prompts(prompt_count(request.prompt), request.n or 1)
        except VLLMValidationError as e:
            return create_error_response(e)
        return await create_completion(request, raw_request)

    return bounded


def _replace_route(app: FastAPI, path: str, method: str, endpoint) -> None:
    def other(route: BaseRoute) -> bool:
        return not (getattr(route, "path", None) == path
                    and method in (getattr(route, "methods", None) or ()))

    app.router.routes[:] = [route for route in app.router.routes if other(route)]
    app.add_api_route(path, endpoint, methods=[method])


async def _models(request: Request) -> ModelList:
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
    names = manager.listed(services.settings.max_listed_adapters)
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


async def _routing(body: RoutingRequest, request: Request) -> RoutingResponse:
    """The routing each prompt gets: rendered as the completions (`prompt`) or chat
    (`messages`) endpoint renders it, routed on its first `route_tokens` tokens."""
    services: Services = request.app.state.services
    try:
        entry = services.registry.get(body.model)
    except AdapterNotFound:
        raise RequestError(404, f"The model `{body.model}` is not an adapter of this server.",
                           code="model_not_found", param="model") from None
    if (body.prompt is None) == (body.messages is None):
        raise RequestError(400, "give either prompt or messages", param="prompt")
    routed = []
    for i, ids in enumerate(await _render(request, body)):
        if not ids:
            raise RequestError(400, f"prompt {i} is empty", param="prompt")
        if max(ids) >= services.engine.vocab_size or min(ids) < 0:
            raise RequestError(400, f"prompt {i} holds token ids outside the vocabulary of "
                                    f"{services.engine.vocab_size}", param="prompt")
        count = min(body.route_tokens or len(ids), len(ids))
        routing = services.route.routing(entry, ids[:count])
        routed.append(PromptRouting(prompt_index=i, prompt_tokens=len(ids),
                                    routed_tokens=count, expert_weights=routing.expert_weights,
                                    expert_probabilities=routing.expert_probabilities))
    return RoutingResponse(model=entry.name, version=entry.version, data=routed)


async def _render(request: Request, body: RoutingRequest) -> list[list[int]]:
    tokenization = request.app.state.serving_tokenization
    if body.messages is not None:
        rendered = [TokenizeChatRequest(model=body.model, messages=body.messages)]
    else:
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError(400, "prompt must not be an empty list", param="prompt")
        rendered = [p if isinstance(p, list) else TokenizeCompletionRequest(model=body.model,
                                                                            prompt=p)
                    for p in prompts]
    results = []
    for item in rendered:
        if isinstance(item, list):
            results.append(item)
            continue
        response = await tokenization.create_tokenize(item, request)
        if isinstance(response, ErrorResponse):
            raise RequestError(response.error.code, response.error.message)
        results.append(response.tokens)
    return results


class _AccessMiddleware:
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


class _BodyLimitMiddleware:
    """Bodies over their limit get a 413 before anything parses them (bodies.py). Management
    calls are small JSON; uploads are bounded by their own handlers (--max-upload-mb);
    everything else by --max-request-mb."""

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
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: vLLM watches for disconnects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class _ResidencyMiddleware:
    """A request naming an adapter the store serves gets it resident before vLLM sees the
    request, and holds it until the response has ended, streamed or not: a first request waits
    for the load (milliseconds), one whose adapter cannot be read gets a 400 naming the
    problem, and one that finds every slot held longer than --adapter-wait-seconds a 503 with
    Retry-After, all before any stream starts. Requests for resident adapters only take a hold.
    The project's own management, files and fine-tuning routes pass by."""

    PASSING = (management.router.prefix, files.router.prefix, fine_tuning.router.prefix,
               vllm_lora.LOAD_PATH, vllm_lora.UNLOAD_PATH)

    def __init__(self, app, services: Services):
        self.app = app
        self.catalog = services.manager.catalog
        self.resident = services.manager.resident

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"].startswith(self.PASSING)):
            return await self.app(scope, receive, send)
        body, receive = await _buffered(receive)
        name = _model_of(body) if body is not None else None
        if name not in self.catalog:  # the base model, or not an adapter: vLLM answers
            return await self.app(scope, receive, send)
        arrived = time.perf_counter()
        cold = self.resident.registry.find(name) is None
        try:
            entry = await self.resident.acquire(name)
        except ResidentSetFull as e:
            return await _unavailable(str(e))(scope, receive, send)
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
        try:
            return await self.app(scope, receive, send)
        finally:
            self.resident.release(entry)


async def _buffered(receive):
    """The request's body (None if the client left), and a receive that replays it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body, replayed = b"".join(chunks), False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


def _model_of(body: bytes) -> str | None:
    """The `model` a JSON request body names, if it names one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _unavailable(message: str):
    response = RequestError(503, message, code="adapters_busy").response()
    response.headers["retry-after"] = RETRY_AFTER_SECONDS
    return response


class _RetryAfterMiddleware:
    """vLLM answers 503 when its queue limits are reached (--max-num-queued-reqs,
    --max-num-queued-tokens): say when to try again, as clients and load balancers expect."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry_after(message):
            headers = message.get("headers", [])
            if (message["type"] == "http.response.start" and message["status"] == 503
                    and not any(name.lower() == b"retry-after" for name, _ in headers)):
                message = {**message, "headers": [*headers,
                                                  (b"retry-after", RETRY_AFTER_SECONDS.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_retry_after)


class _AdapterVersionMiddleware:
    """Every response generated with an adapter names the adapter's version (the store's, the
    same on every replica) in a header: which content answered, when a replace raced the
    request. Known before a stream starts: the engine client resolves the adapter when vLLM
    calls `generate`, before the first byte."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: set[int] = set()
        SERVED_VERSIONS.set(served)

        async def send_with_version(message):
            if message["type"] == "http.response.start" and served:
                value = ",".join(map(str, sorted(served))).encode()
                message = {**message, "headers": [*message.get("headers", []),
                                                  (ADAPTER_VERSION_HEADER, value)]}
            await send(message)

        return await self.app(scope, receive, send_with_version)


def serve(settings: ServerSettings) -> None:
    import uvloop

    uvloop.run(run(settings))

