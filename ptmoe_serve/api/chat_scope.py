"""A chat's routing scope (routing/scope.py), applied where vLLM renders chats: its renderer's
`preprocess_chat` renders the messages of every endpoint that takes them (chat completions, the
Responses API, previous_response_id's history included, and /tokenize). Wrapped here, it also
renders turn 1 of a conversation whose scope is `first_turn`, and tells the engine client
(CHAT_ROUTING, engine/client.py) how many of the prompt's leading tokens the router reads.

The scope is the request's `vllm_xargs.ptmoe_route_scope`, else its adapter's `route_scope`.
An explicit `vllm_xargs.ptmoe_route_tokens` wins over both (engine/client.py)."""

from __future__ import annotations

import functools

from ptmoe_serve.adapters.registry import AdapterRegistry
from ptmoe_serve.engine.client import CHAT_ROUTING, ChatRouting, requested_scope
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.routing.scope import first_turn, routed_length

# How turn 1 is rendered: as the prompt that asks for its answer, whatever the request asks of
# its own last message.
TURN_ONE = {"add_generation_prompt": True, "continue_final_message": False}


def scoped_chat_rendering(preprocess_chat, registry: AdapterRegistry, metrics: Metrics):
    """vLLM's `OnlineRenderer.preprocess_chat`, also saying what the router reads."""

    @functools.wraps(preprocess_chat)
    async def preprocess(request, messages, *args, **kwargs):
        CHAT_ROUTING.set(None)
        scope = _scope(request, registry)
        conversation, engine_inputs = await preprocess_chat(request, messages, *args, **kwargs)
        ids = engine_inputs[0].get("prompt_token_ids") if len(engine_inputs) == 1 else None
        turn_one = first_turn(messages) if scope == "first_turn" and ids else None
        if turn_one is None:  # the whole prompt (or no token prompt to route)
            return conversation, engine_inputs
        fields = type(request).model_fields
        as_turn_one = request.model_copy(update={k: v for k, v in TURN_ONE.items()
                                                 if k in fields})
        _, (first,) = await preprocess_chat(as_turn_one, turn_one, *args, **kwargs)
        count = routed_length(ids, first.get("prompt_token_ids") or [])
        if count is None:
            metrics.route_scope_fallbacks.inc()
        CHAT_ROUTING.set(ChatRouting(len(ids), count or len(ids),
                                     "first_turn" if count else "prompt"))
        return conversation, engine_inputs

    return preprocess


def _scope(request, registry: AdapterRegistry) -> str | None:
    """The request's scope; None for a model that is not a resident adapter."""
    asked = requested_scope(getattr(request, "vllm_xargs", None))
    entry = registry.find(getattr(request, "model", None) or "")
    if entry is None:
        return None
    return asked if asked is not None else entry.adapter.config.route_scope
