"""What the router reads of a chat: an adapter's routing scope (`route_scope` in its config).

- `prompt` (the paper's): the whole input, whatever the turn.
- `first_turn`: turn 1's whole prompt, that is the messages through the first user message with
  the generation header, rendered as the request renders them (its template, tools and
  `chat_template_kwargs`). Every later turn of a conversation then gets turn 1's soft prompt,
  so vLLM's prefix cache reuses the turns before the new one. A single-turn chat is routed the
  same under both scopes.

A completion has no turns: it is routed on its whole prompt under either scope. The trainer,
the fine-tuning API and the server all route through `first_turn` and `routed_length`, so an
adapter is trained on what it is served. Plain data: no torch, no vLLM."""

from __future__ import annotations

from typing import get_args

from ptmoe_serve.adapters.config import RouteScope

ROUTE_SCOPES: tuple[str, ...] = get_args(RouteScope)
# A request's choice of scope for this request alone (vllm_xargs), over the adapter's.
ROUTE_SCOPE = "ptmoe_route_scope"


def check_scope(value: object, where: str) -> RouteScope:
    """`value` as a scope; a ValueError naming `where` and the scopes if it is none."""
    if value not in ROUTE_SCOPES:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, ROUTE_SCOPES))}; got "
                         f"{value!r}")
    return value  # type: ignore[return-value]


def first_turn(messages: list) -> list | None:
    """Turn 1's messages (through the first user message) where `messages` goes on past
    them; None where `messages` is turn 1 itself (or holds no user message)."""
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role",
                                                                              None)
        if role == "user":
            return list(messages[: i + 1]) if i + 1 < len(messages) else None
    return None


def routed_length(prompt_ids: list[int], first_turn_ids: list[int]) -> int | None:
    """How many leading tokens of `prompt_ids` the router reads under `first_turn`: turn 1's
    prompt, where it is a token prefix of this prompt; None where it is not (a template that
    rewrites earlier turns, a prompt truncated on the left), and the whole prompt is read."""
    count = len(first_turn_ids)
    if 0 < count <= len(prompt_ids) and prompt_ids[:count] == list(first_turn_ids):
        return count
    return None
