"""FastAPI routes: OpenAI-compatible completions, chat, models, health and metrics.

Transport only: requests are parsed by the protocol models, the work is done by `Serving`, and
every failure leaves as an OpenAI-shaped error. A client that disconnects cancels its handler,
which aborts its generation in vLLM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from vllm.outputs import RequestOutput

from ptmoe_serve import management, protocol
from ptmoe_serve.metrics import UNKNOWN_ADAPTER
from ptmoe_serve.services import Services, start_services
from ptmoe_serve.serving import Prepared, RequestError, Serving
from ptmoe_serve.settings import ServerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


def create_app(settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = await start_services(settings)
        app.state.services = services
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(title="ptmoe_serve", lifespan=lifespan)
    _add_error_handlers(app)
    _add_routes(app)
    app.include_router(management.router)
    return app


def _services(request: Request) -> Services:
    return request.app.state.services


def _require_api_key(request: Request) -> None:
    _services(request).access.check_api(request)


def _error(status: int, message: str, code: str | None, param: str | None = None,
           type_: str = "BadRequestError") -> JSONResponse:
    body = protocol.ErrorResponse(error=protocol.ErrorInfo(
        message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _record(request: Request, status: int, error_type: str | None = None) -> None:
    if request.url.path not in ("/v1/completions", "/v1/chat/completions"):
        return
    metrics = _services(request).metrics
    adapter = getattr(request.state, "adapter", UNKNOWN_ADAPTER)
    metrics.requests.labels(adapter, request.url.path, str(status)).inc()
    if error_type is not None:
        metrics.errors.labels(adapter, error_type).inc()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        _record(request, e.status, e.code)
        return _error(e.status, e.message, e.code, e.param, e.type)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            if err["type"] == "json_invalid":
                problems.append(f"malformed JSON body: {err.get('ctx', {}).get('error', '')} "
                                f"at character {err['loc'][-1]}")
                continue
            where = ".".join(str(part) for part in err["loc"] if part != "body")
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        _record(request, 400, "invalid_request")
        return _error(400, "; ".join(problems) or "invalid request", "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        type_ = "NotFoundError" if e.status_code == 404 else "BadRequestError"
        return _error(e.status_code, str(e.detail), None, type_=type_)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        _record(request, 500, "internal_error")
        return _error(500, f"internal error: {type(e).__name__}", "internal_error",
                      type_="InternalServerError")


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and with it the generation) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result()


async def _collect(serving: Serving, prepared: Prepared) -> list[RequestOutput]:
    outputs: list[RequestOutput | None] = [None] * len(prepared.engine_prompts)
    async for i, output in serving.generate(prepared):
        outputs[i] = output
    return outputs


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        except RequestError as e:
            error = protocol.ErrorInfo(message=e.message, type=e.type, code=e.code)
            yield f"data: {protocol.ErrorResponse(error=error).model_dump_json()}\n\n"
        except Exception as e:  # the status line is sent already: report in the stream
            logger.exception("stream failed")
            error = protocol.ErrorInfo(message=f"internal error: {type(e).__name__}",
                                       type="InternalServerError", code="internal_error")
            yield f"data: {protocol.ErrorResponse(error=error).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        services = _services(request)
        if not services.engine.is_running:
            return _error(503, "the engine is not running", "engine_dead",
                          type_="ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request):
        services = _services(request)
        services.access.check_metrics(request)
        services.metrics.adapters_loaded.set(len(services.registry))
        services.metrics.engine_requests.set(services.engine.num_unfinished_requests)
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(_require_api_key)])
    async def models(request: Request) -> protocol.ModelList:
        return _services(request).model_list()

    @app.post("/v1/completions", dependencies=[Depends(_require_api_key)])
    async def completions(body: protocol.CompletionRequest, request: Request):
        serving = _services(request).serving
        if body.echo and body.logprobs is not None:
            raise RequestError(400, "echo together with logprobs is not supported: prompt "
                                    "logprobs are not computed under a soft prompt", param="echo")
        token_ids = serving.completion_token_ids(body.prompt)
        request.state.adapter = _label(serving, body.model)
        prepared = await serving.prepare(protocol.random_id("cmpl"), body, token_ids,
                                         body.max_tokens, body.logprobs)
        prefixes = _echo_prefixes(serving, body, token_ids)
        _record(request, 200)
        if body.stream:
            return _sse(_completion_chunks(serving, prepared, body, prefixes))
        outputs = await _until_disconnect(request, _collect(serving, prepared))
        choices = [serving.completion_choice(prepared, i, o, prefixes[i])
                   for i, out in enumerate(outputs) for o in out.outputs]
        generated = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return protocol.CompletionResponse(
            id=prepared.request_id, model=body.model, choices=sorted(choices, key=lambda c: c.index),
            usage=serving.usage(prepared, generated), routing=prepared.routing)

    @app.post("/v1/chat/completions", dependencies=[Depends(_require_api_key)])
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        serving = _services(request).serving
        token_ids = [serving.chat_token_ids(body.messages)]
        request.state.adapter = _label(serving, body.model)
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = await serving.prepare(protocol.random_id("chatcmpl"), body, token_ids,
                                         body.max_completion_tokens or body.max_tokens,
                                         top_logprobs)
        _record(request, 200)
        if body.stream:
            return _sse(_chat_chunks(serving, prepared, body))
        (output,) = await _until_disconnect(request, _collect(serving, prepared))
        choices = [
            protocol.ChatChoice(index=o.index, message=protocol.AssistantMessage(content=o.text),
                                logprobs=serving.chat_logprobs(prepared, o),
                                finish_reason=o.finish_reason,
                                token_ids=list(o.token_ids) if body.return_token_ids else None)
            for o in sorted(output.outputs, key=lambda o: o.index)
        ]
        generated = sum(len(o.token_ids) for o in output.outputs)
        return protocol.ChatCompletionResponse(
            id=prepared.request_id, model=body.model, choices=choices,
            usage=serving.usage(prepared, generated), routing=prepared.routing,
            prompt_token_ids=token_ids[0] if body.return_token_ids else None)


def _label(serving: Serving, model: str) -> str:
    if model == serving.base_model_name or model in serving.registry:
        return model
    return UNKNOWN_ADAPTER


def _echo_prefixes(serving: Serving, body: protocol.CompletionRequest,
                   token_ids: list[list[int]]) -> list[str]:
    if not body.echo:
        return [""] * len(token_ids)
    if isinstance(body.prompt, str):
        return [body.prompt]
    texts = body.prompt if all(isinstance(p, str) for p in body.prompt) else None
    return texts or [serving.tokenizer.decode(ids) for ids in token_ids]


def _stream_usage(body: protocol.SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _completion_chunks(serving: Serving, prepared: Prepared,
                             body: protocol.CompletionRequest,
                             prefixes: list[str]) -> AsyncIterator[protocol.CompletionResponse]:
    def chunk(choices, **extra) -> protocol.CompletionResponse:
        return protocol.CompletionResponse(id=prepared.request_id, model=body.model,
                                           choices=choices, **extra)

    if body.echo:
        yield chunk([protocol.CompletionChoice(index=i * body.n + j, text=prefixes[i])
                     for i in range(len(prefixes)) for j in range(body.n)])
    if prepared.routing is not None:
        yield chunk([], routing=prepared.routing)
    generated = 0
    async for i, output in serving.generate(prepared):
        generated += sum(len(o.token_ids) for o in output.outputs)
        yield chunk([serving.completion_choice(prepared, i, o) for o in output.outputs])
    if _stream_usage(body):
        yield chunk([], usage=serving.usage(prepared, generated))


async def _chat_chunks(serving: Serving, prepared: Prepared,
                       body: protocol.ChatCompletionRequest) -> AsyncIterator[protocol.ChatCompletionChunk]:
    def chunk(choices, **extra) -> protocol.ChatCompletionChunk:
        return protocol.ChatCompletionChunk(id=prepared.request_id, model=body.model,
                                            choices=choices, **extra)

    yield chunk([protocol.ChatChunkChoice(index=j, delta=protocol.DeltaMessage(role="assistant",
                                                                               content=""))
                 for j in range(body.n)], routing=prepared.routing)
    generated = 0
    async for _, output in serving.generate(prepared):
        generated += sum(len(o.token_ids) for o in output.outputs)
        yield chunk([
            protocol.ChatChunkChoice(index=o.index, delta=protocol.DeltaMessage(content=o.text),
                                     logprobs=serving.chat_logprobs(prepared, o),
                                     finish_reason=o.finish_reason)
            for o in output.outputs
        ])
    if _stream_usage(body):
        yield chunk([], usage=serving.usage(prepared, generated))
