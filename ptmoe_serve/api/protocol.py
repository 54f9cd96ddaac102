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
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    num_experts: int
    prompt_length: int
    rank: int
    top_k: int
    router_scaling: str
    hidden_size: int
    base_model_name_or_path: str
    num_parameters: int
    bytes_on_device: int
    loaded_at: int
    requests_served: int
    source: str
    # Time the load took in the server, for the call that loaded it.
    load_ms: float | None = None


class FailedAdapter(BaseModel):
    """A folder in the store (or linked from an allowed root) that could not be loaded."""
    name: str
    error: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    failed: list[FailedAdapter] = []


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
    expert_probabilities: list[float]
    expert_weights: list[float]


class RoutingResponse(BaseModel):
    object: Literal["routing"] = "routing"
    model: str
    version: int
    data: list[PromptRouting]
