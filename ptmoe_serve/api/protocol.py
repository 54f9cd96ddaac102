"""The project's own wire models, beside vLLM's OpenAI ones: adapter management, adapter cards
in /v1/models, and the routing a prompt gets. Data only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    replace: bool = False


class AdapterInfo(BaseModel):
    """An adapter the store serves; its shape and state when it is resident."""

    object: Literal["adapter"] = "adapter"
    name: str
    resident: bool
    pinned: bool = False
    source: str | None = None
    version: int | None = None
    num_experts: int | None = None
    prompt_length: int | None = None
    rank: int | None = None
    top_k: int | None = None
    router_scaling: str | None = None
    # What the router reads of a chat: "prompt" (all of it) or "first_turn".
    route_scope: str | None = None
    hidden_size: int | None = None
    base_model_name_or_path: str | None = None
    num_parameters: int | None = None
    bytes_on_device: int | None = None
    # Its slot in its shape's bank (another after an eviction and a new load).
    slot: int | None = None
    loaded_at: int | None = None
    requests_served: int | None = None
    # Time the load took in the server, for the call that loaded it.
    load_ms: float | None = None


class FailedAdapter(BaseModel):
    """A folder in the store (or linked from an allowed root) that could not be loaded."""
    name: str
    error: str


class AdapterList(BaseModel):
    """A page of the store's adapters, in name order (`after` the last one for the next)."""

    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool
    in_store: int
    resident: int
    max_resident: int
    # The page's adapters that failed to load, with the reason; every one of them counted.
    failed: list[FailedAdapter] = []
    failed_count: int = 0


class RoutingRequest(BaseModel):
    """The prompts of a completion (`prompt`) or of a chat (`messages`), rendered by vLLM
    exactly as those endpoints render them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]] | None = None
    messages: list[dict] | None = None
    # How many leading prompt tokens the router reads (all when unset), as in a request's
    # vllm_xargs.
    route_tokens: int | None = Field(None, ge=1)


class PromptRouting(BaseModel):
    prompt_index: int
    prompt_tokens: int
    routed_tokens: int
    # What the router read: "prompt" (all of it, or the request's route_tokens) or
    # "first_turn" (a chat's turn 1, under the adapter's scope).
    route_scope: str
    expert_probabilities: list[float]
    expert_weights: list[float]


class RoutingResponse(BaseModel):
    object: Literal["routing"] = "routing"
    model: str
    version: int
    data: list[PromptRouting]
