"""The HTTP server: vLLM's own OpenAI application, built by vLLM's launcher functions over the
adapter-aware engine client (engine/client.py), with the project's routes (adapter management,
vLLM's runtime LoRA endpoints over it, fine-tuning's files and jobs, adapter cards in
/v1/models, a prompt's routing) and middleware (middleware.py) added.

Every OpenAI and vLLM endpoint, field, error and metric is vLLM's; an adapter's name is one
more model name to it."""

from __future__ import annotations

import functools
import logging

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMValidationError
from vllm.v1.metrics.prometheus import get_prometheus_registry

from ptmoe_serve.api import files, fine_tuning, management, vllm_lora
from ptmoe_serve.api.auth import AccessPolicy
from ptmoe_serve.api.chat_scope import scoped_chat_rendering
from ptmoe_serve.api.errors import RequestError, request_error_handler, store_error_handler
from ptmoe_serve.api.middleware import (AccessMiddleware, BodyLimitMiddleware,
                                        ResidencyMiddleware, ResponseHeadersMiddleware)
from ptmoe_serve.api.models import list_models
from ptmoe_serve.api.prompt_routing import route_prompts
from ptmoe_serve.api.protocol import RoutingResponse
from ptmoe_serve.config import ServerSettings
from ptmoe_serve.disk import StoreError
from ptmoe_serve.engine.engine import engine_args
from ptmoe_serve.engine.limits import RequestLimits, prompt_count
from ptmoe_serve.engine.services import Services, start_services
from ptmoe_serve.engine.vllm_internals import (build_app,
                                               build_async_engine_client_from_engine_args,
                                               init_app_state, serve_http, setup_server)
from ptmoe_serve.train.files import TrainingFiles
from ptmoe_serve.train.jobs import FineTuningJobs

logger = logging.getLogger(__name__)


async def run(settings: ServerSettings, access: AccessPolicy) -> None:
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
            add_project_routes(app, services, access)
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


def add_project_routes(app: FastAPI, services: Services, access: AccessPolicy) -> None:
    state = app.state
    state.services = services
    settings = services.settings
    state.access = access
    # Fine-tuning's files and jobs live in the store, for every server and worker over it.
    state.files = TrainingFiles(settings.adapters_dir)
    state.jobs = FineTuningJobs(settings.adapters_dir, settings.options.store_lock_timeout)
    # vLLM's serving layer resolves model names through this table: adapters are in it. (This
    # and the serving objects' methods replaced below are named in engine/vllm_internals.py.)
    state.openai_serving_models.lora_requests = services.client.names
    # Every endpoint's chat is rendered here: what the router reads follows its scope.
    state.online_renderer.preprocess_chat = scoped_chat_rendering(
        state.online_renderer.preprocess_chat, services.registry, services.metrics)
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
    _replace_route(app, "/v1/models", "GET", list_models)
    app.add_api_route("/v1/routing", route_prompts, methods=["POST"],
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
    app.user_middleware[:0] = [
        Middleware(AccessMiddleware, access=access),
        Middleware(BodyLimitMiddleware, limit=settings.options.max_request_bytes),
        Middleware(ResidencyMiddleware, resident=services.manager.resident,
                   catalog=services.manager.catalog),
        Middleware(ResponseHeadersMiddleware)]
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


def serve(settings: ServerSettings, access: AccessPolicy) -> None:
    import uvloop

    uvloop.run(run(settings, access))

