"""The one seam between vLLM's OpenAI serving layer and PT-MoE adapters: vLLM's engine client,
as its handlers see it, with `generate` taught what an adapter's name means.

vLLM resolves `model` through `AdapterNames` (the store's catalog seen as its table of LoRA
names) to an `AdapterRequest`, vLLM's `LoRARequest` carrying the adapter's resident entry (the
server made it resident, and holds it, before vLLM saw the request: api/middleware.py),
renders the prompt (chat template, tokenization, truncation), and calls `generate` with the
token ids and that request. For an adapter, `generate` checks the prompt against the context (a 400 before any
stream starts) and resolves it once, into a `RoutedRequest`: the entry, the token ids, how many
of them the router reads. It shares the HTTP request's hold on the adapter's slot, has the route
(routing/route.py) make the engine's prompt, and strips the T soft-prompt positions from what
comes back (prompt token ids, prompt logprobs, cached-token counts), so echo, prompt logprobs
and usage describe the caller's prompt. Everything else is vLLM's engine client, unchanged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from vllm.exceptions import GracefulHTTPError, VLLMNotFoundError, VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from ptmoe_serve.adapters.catalog import AdapterCatalog
from ptmoe_serve.adapters.config import RouteScope
from ptmoe_serve.adapters.registry import AdapterEntry, AdapterRegistry, Hold
from ptmoe_serve.config import ROUTE_TOKENS
from ptmoe_serve.engine.limits import RequestLimits
from ptmoe_serve.engine.lora_stats import AdapterRequestNames
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.routing.route import Route, RoutedRequest
from ptmoe_serve.routing.scope import ROUTE_SCOPE, check_scope

# The adapter versions an HTTP request's generations were routed with (set per request by the
# server, which reports them in a response header).
SERVED_VERSIONS: ContextVar[set[int] | None] = ContextVar("served_versions", default=None)
# When an HTTP request that had to load its adapter arrived (perf_counter), else None: its
# first token is counted apart (set by the server).
COLD_START: ContextVar[float | None] = ContextVar("cold_start", default=None)
# The HTTP request's hold on its adapter (set by the server, which made the adapter resident
# for it): its engine requests share it rather than hold the adapter again.
REQUEST_HOLD: ContextVar[Hold | None] = ContextVar("request_hold", default=None)


@dataclass(frozen=True)
class ChatRouting:
    """What the router reads of a rendered chat prompt, under its scope (routing/scope.py)."""

    prompt_tokens: int  # the rendered prompt's length: it applies to that prompt alone
    route_tokens: int
    scope: RouteScope  # the scope applied: "prompt" where first_turn fell back to it


def requested_scope(vllm_xargs: Mapping | None) -> RouteScope | None:
    """The scope a request asks for itself (`vllm_xargs.ptmoe_route_scope`), or None; a 400
    naming the field where it is no scope."""
    asked = (vllm_xargs or {}).get(ROUTE_SCOPE)
    if asked is None:
        return None
    try:
        return check_scope(asked, f"vllm_xargs.{ROUTE_SCOPE}")
    except ValueError as e:
        raise VLLMValidationError(str(e), parameter="vllm_xargs") from None


# The last chat prompt the request rendered, with what its router reads (set by the server's
# chat renderer, api/chat_scope.py).
CHAT_ROUTING: ContextVar[ChatRouting | None] = ContextVar("chat_routing", default=None)


class AdapterRequest(LoRARequest, kw_only=True):
    """vLLM's name for a request's adapter, with the resident entry it was resolved to (None
    if it was not resident): vLLM's serving layer hands it to `generate` as it is."""

    entry: AdapterEntry | None


class AdapterNames(Mapping[str, LoRARequest]):
    """The store's catalog as vLLM's serving layer's table of adapter names
    (`OpenAIServingModels.lora_requests`): every adapter the store serves, resident or not. A
    live view, so a load, replace or unload is seen by the next request with no copy to keep
    in step, and looking a name up costs a dict lookup however many the store holds."""

    def __init__(self, catalog: AdapterCatalog, registry: AdapterRegistry):
        self._catalog = catalog
        self._registry = registry

    def __getitem__(self, name: str) -> AdapterRequest:
        folder = self._catalog.folder(name)
        if folder is None:
            raise KeyError(name)
        # lora_int_id is vLLM's id for its own LoRA engine, which never sees these requests
        # (generate routes them): any positive number, the same for every adapter.
        return AdapterRequest(lora_name=name, lora_int_id=1, lora_path=str(folder),
                              entry=self._registry.find(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._catalog

    def __iter__(self) -> Iterator[str]:
        return iter(self._catalog.page(None, len(self._catalog)))

    def __len__(self) -> int:
        return len(self._catalog)


class AdapterEngineClient:
    """vLLM's `AsyncLLM`, passed through but for `generate`."""

    def __init__(self, llm: AsyncLLM, registry: AdapterRegistry, catalog: AdapterCatalog,
                 route: Route, metrics: Metrics, base_model_name: str,
                 routes_prompt_logprobs: bool, limits: RequestLimits):
        self._llm = llm
        self._limits = limits
        self._registry = registry
        self.names = AdapterNames(catalog, registry)
        self._route = route
        self._metrics = metrics
        self._base_model_name = base_model_name
        # Prompt logprobs need token ids at every position: the engine route has them, the
        # api route hands vLLM embeddings, for which vLLM computes none.
        self._routes_prompt_logprobs = routes_prompt_logprobs
        self._max_model_len = llm.model_config.max_model_len
        self._vocab_size = llm.model_config.get_vocab_size()
        # Which adapter each engine request runs with, for vLLM's per-LoRA request counts.
        self.request_names = AdapterRequestNames()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompt, sampling_params: SamplingParams, request_id: str, *,
                 lora_request: AdapterRequest | None = None, **kwargs
                 ) -> AsyncGenerator[RequestOutput, None]:
        """vLLM's `generate`. Refusals are raised here, before the caller iterates: a
        streaming request gets its 400 before the stream starts."""
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        self._limits.check(sampling_params, len(tokens or ()))
        if lora_request is None:
            return self._observed(self._base_model_name, None, sampling_params,
                                  self._llm.generate(prompt, sampling_params, request_id,
                                                     **kwargs))
        entry = self._current(lora_request.lora_name, lora_request.entry)
        served = SERVED_VERSIONS.get()
        if served is not None:
            served.add(entry.version)
        ids = self._token_ids(prompt, entry)
        self._check_prompt_logprobs(sampling_params)
        params = self._fit(sampling_params, entry, len(ids))
        routed = self._generate_routed(
            RoutedRequest(entry, ids, self._route_tokens(sampling_params, len(ids))), prompt,
            params, request_id, kwargs)
        return self._observed(entry.name, entry, params, routed)

    # -- checks, before anything runs ------------------------------------------------------

    def _current(self, name: str, entry: AdapterEntry | None) -> AdapterEntry:
        """`entry`, or what replaced it since vLLM looked the name up: the resident entry of
        `name`. A 404 if the store serves it no more; a 503 if it is not resident (the server
        makes a request's adapter resident before vLLM sees the request: only a request that
        named it some other way meets this)."""
        if entry is not None and not entry.retired:
            return entry
        current = self._registry.find(name)
        if current is not None:
            return current
        if name not in self.names:
            raise VLLMNotFoundError(f"The model `{name}` does not exist.")
        raise GracefulHTTPError(f"adapter '{name}' is not resident; try again",
                                HTTPStatus.SERVICE_UNAVAILABLE)

    def _token_ids(self, prompt, entry: AdapterEntry) -> list[int]:
        kind = prompt.get("type") if isinstance(prompt, dict) else None
        if kind != "token":
            raise VLLMValidationError(
                f"adapter '{entry.name}' takes text or token-id prompts; this request's prompt "
                f"is of type {kind!r} (prompt embeddings and multimodal inputs carry no tokens "
                "to route on)", parameter="prompt")
        ids = list(prompt["prompt_token_ids"])
        if not ids:
            raise VLLMValidationError("prompt is empty: it must hold at least one token",
                                      parameter="prompt")
        # Checked here, not in the engine: the routing step reads these ids' embeddings.
        bad = next((t for t in ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise VLLMValidationError(f"Token id {bad} is out of vocabulary (the model has "
                                      f"{self._vocab_size} tokens)", parameter="prompt")
        length = entry.adapter.config.prompt_length
        if len(ids) + length >= self._max_model_len:
            raise VLLMValidationError(
                f"This model's maximum context length is {self._max_model_len} tokens. "
                f"However, your prompt has {len(ids)} tokens and {length} soft-prompt positions "
                f"of adapter '{entry.name}' ({len(ids) + length} in all), which leaves no room "
                "to generate. Please shorten the prompt.", parameter="prompt")
        return ids

    def _route_tokens(self, params: SamplingParams, prompt_tokens: int) -> int:
        """What the router reads: the request's own count; else, for a chat, what its scope
        says; else the whole prompt."""
        extra = params.extra_args or {}
        requested_scope(extra)  # a chat's renderer read it already; a completion's is checked
        value = extra.get(ROUTE_TOKENS)
        if value is None:
            chat = CHAT_ROUTING.get()
            if chat is not None and chat.prompt_tokens == prompt_tokens:
                return chat.route_tokens
            return prompt_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VLLMValidationError(
                f"vllm_xargs.{ROUTE_TOKENS} must be a positive integer: the number of leading "
                f"prompt tokens the router reads; got {value!r}", parameter="vllm_xargs")
        return min(value, prompt_tokens)

    def _check_prompt_logprobs(self, params: SamplingParams) -> None:
        if params.prompt_logprobs is not None and not self._routes_prompt_logprobs:
            raise VLLMValidationError(
                "prompt logprobs (echo with logprobs, prompt_logprobs) are not computed for "
                "adapters on this server's api routing route, which hands vLLM prompt "
                "embeddings; the engine route (--routing-location engine) computes them",
                parameter="prompt_logprobs")

    def _fit(self, params: SamplingParams, entry: AdapterEntry, prompt_tokens: int
             ) -> SamplingParams:
        """vLLM sized max_tokens for the prompt alone; the soft prompt takes room too."""
        room = self._max_model_len - entry.adapter.config.prompt_length - prompt_tokens
        if params.max_tokens is not None and params.max_tokens <= room:
            return params
        params = params.clone()
        params.max_tokens = room
        return params

    # -- generating --------------------------------------------------------------------------

    async def _generate_routed(self, request: RoutedRequest, prompt: dict,
                               params: SamplingParams, request_id: str, kwargs: dict
                               ) -> AsyncGenerator[RequestOutput, None]:
        entry = request.entry
        # Held until the request ends: the route and the engine read the adapter's slot (a
        # preempted request is prefilled anew), so the slot is not reused before then. The
        # HTTP request's hold, shared; its own where the adapter was replaced since the HTTP
        # request arrived (its slot may serve another, so the request follows the name again).
        if entry.retired:
            entry = self._current(entry.name, None)
            request = RoutedRequest(entry, request.token_ids, request.route_tokens)
        hold = REQUEST_HOLD.get()
        if hold is None or hold.entry is not entry or not hold.join():
            hold = self._registry.hold(entry)  # a version newer than the request's own
        self.request_names.add(request_id, entry.name)
        try:
            engine_prompt = await self._route.engine_prompt(request)
            for field in ("prompt", "cache_salt"):
                if field in prompt:
                    engine_prompt[field] = prompt[field]
            soft = entry.adapter.config.prompt_length
            async for output in self._llm.generate(engine_prompt, params, request_id,
                                                   **kwargs):
                yield _without_soft_prompt(output, request.token_ids, soft)
        finally:
            self.request_names.discard(request_id)
            hold.leave()

    async def _observed(self, label: str, entry: AdapterEntry | None, params: SamplingParams,
                        outputs: AsyncGenerator[RequestOutput, None]
                        ) -> AsyncGenerator[RequestOutput, None]:
        """The outputs, counted in the project's per-adapter series (while the adapter is
        loaded: a request that ends after its adapter's unload must not bring back the series
        the unload removed)."""
        metrics = self._metrics
        started = time.perf_counter()
        arrived = COLD_START.get()
        first_token_seen, generated, prompt_tokens, outcome = False, 0, 0, "error"
        delta = params.output_kind == RequestOutputKind.DELTA
        if entry is not None:
            entry.requests_served += 1
        metrics.requests_running.inc()
        try:
            async for output in outputs:
                count = sum(len(o.token_ids) for o in output.outputs)
                generated = generated + count if delta else count
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                if not first_token_seen and count:
                    first_token_seen = True
                    if self._counted(label):
                        metrics.time_to_first_token.labels(label).observe(
                            time.perf_counter() - started)
                    if arrived is not None:
                        metrics.time_to_first_token_cold.observe(time.perf_counter() - arrived)
                yield output
            outcome = "finished"
            if self._counted(label):
                metrics.e2e_latency.labels(label).observe(time.perf_counter() - started)
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "aborted"
            raise
        finally:
            metrics.requests_running.dec()
            if self._counted(label):
                metrics.requests.labels(label, outcome).inc()
                metrics.prompt_tokens.labels(label).inc(prompt_tokens)
                metrics.generation_tokens.labels(label).inc(generated)

    def _counted(self, label: str) -> bool:
        return label == self._base_model_name or label in self._registry


def _without_soft_prompt(output: RequestOutput, ids: list[int], soft: int) -> RequestOutput:
    """The output as if the caller's prompt had been all there was: the T placeholder
    positions (and their prompt logprobs) gone. Position 0's logprob stays: with a soft prompt
    before it, the first prompt token has one."""
    if output.prompt_token_ids is not None:
        output.prompt_token_ids = ids
    if output.prompt_logprobs is not None:
        output.prompt_logprobs = output.prompt_logprobs[soft:]
    if output.num_cached_tokens:
        output.num_cached_tokens = max(0, output.num_cached_tokens - soft)
    return output
