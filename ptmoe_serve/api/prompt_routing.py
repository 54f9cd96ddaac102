"""POST /v1/routing: the routing each prompt gets from an adapter, rendered as the completions
or chat endpoint renders it: which experts, with what weights."""

from __future__ import annotations

from fastapi import Request
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.tokenize.protocol import (TokenizeChatRequest,
                                                      TokenizeCompletionRequest)

from ptmoe_serve.adapters.registry import AdapterNotFound
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.protocol import PromptRouting, RoutingRequest, RoutingResponse
from ptmoe_serve.engine.client import CHAT_ROUTING
from ptmoe_serve.engine.services import Services


async def route_prompts(body: RoutingRequest, request: Request) -> RoutingResponse:
    """The routing each prompt gets: rendered as the completions (`prompt`) or chat
    (`messages`) endpoint renders it, routed on its first `route_tokens` tokens, else as its
    scope says (a chat under `first_turn`: turn 1's prompt), else on all of it."""
    services: Services = request.app.state.services
    try:
        entry = services.registry.get(body.model)
    except AdapterNotFound:
        raise RequestError(404, f"The model `{body.model}` is not an adapter of this server.",
                           code="model_not_found", param="model") from None
    if (body.prompt is None) == (body.messages is None):
        raise RequestError(400, "give either prompt or messages", param="prompt")
    routed = []
    rendered = await _render(request, body)
    chat = CHAT_ROUTING.get() if body.messages is not None else None
    for i, ids in enumerate(rendered):
        if not ids:
            raise RequestError(400, f"prompt {i} is empty", param="prompt")
        if max(ids) >= services.engine.vocab_size or min(ids) < 0:
            raise RequestError(400, f"prompt {i} holds token ids outside the vocabulary of "
                                    f"{services.engine.vocab_size}", param="prompt")
        scope, count = "prompt", len(ids)
        if body.route_tokens is not None:
            count = min(body.route_tokens, len(ids))
        elif chat is not None and chat.prompt_tokens == len(ids):
            scope, count = chat.scope, chat.route_tokens
        routing = services.route.routing(entry, ids[:count])
        routed.append(PromptRouting(prompt_index=i, prompt_tokens=len(ids),
                                    routed_tokens=count, route_scope=scope,
                                    expert_weights=routing.expert_weights,
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

