"""The serving logic between the HTTP routes and the engine.

A request is resolved to an adapter (or the bare base model), its prompts are tokenized and
checked against the context, the routing step builds their prompt embeddings, and the engine
generates; outputs are turned into the OpenAI protocol's objects. Nothing here parses HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.utils.async_utils import merge_async_iterators

from ptmoe_serve import protocol
from ptmoe_serve.engine import Engine
from ptmoe_serve.metrics import Metrics
from ptmoe_serve.registry import AdapterEntry, AdapterNotFound, AdapterRegistry
from ptmoe_serve.soft_prompts import SoftPromptBatcher

if TYPE_CHECKING:
    from ptmoe_serve.engine_routing import EngineRouting

T = TypeVar("T")


class RequestError(Exception):
    """A request the server refuses; maps to an OpenAI error response."""

    def __init__(self, status: int, message: str, code: str = "invalid_value",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
                409: "ConflictError", 413: "RequestTooLargeError"}.get(self.status, "BadRequestError")


@dataclass
class Prepared:
    """A request ready for the engine: one engine prompt per user prompt."""

    request_id: str
    model: str
    entry: AdapterEntry | None
    token_ids: list[list[int]]
    engine_prompts: list
    params: SamplingParams
    routing: list[protocol.Routing] | None
    return_token_ids: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def adapter_label(self) -> str:
        return self.entry.name if self.entry else self.model

    @property
    def soft_prompt_length(self) -> int:
        return self.entry.adapter.config.prompt_length if self.entry else 0


class Serving:
    def __init__(self, engine: Engine, registry: AdapterRegistry,
                 routing: SoftPromptBatcher | EngineRouting, tokenizer, metrics: Metrics,
                 base_model_name: str):
        self.engine = engine
        self.registry = registry
        self.routing = routing
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.base_model_name = base_model_name

    # -- resolving and tokenizing ---------------------------------------------------------

    def resolve(self, model: str) -> AdapterEntry | None:
        if model == self.base_model_name:
            return None
        try:
            return self.registry.get(model)
        except AdapterNotFound:
            raise RequestError(404, f"The model '{model}' does not exist.",
                               code="model_not_found", param="model") from None

    def completion_token_ids(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise RequestError(400, "prompt must not be an empty list", param="prompt")
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def chat_token_ids(self, messages: list[protocol.ChatMessage]) -> list[int]:
        conversation = [
            {"role": m.role, "content": m.content if isinstance(m.content, str)
             else "".join(part.text for part in m.content)}
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- preparing ------------------------------------------------------------------------

    async def prepare(self, request_id: str, request: protocol.SamplingFields,
                      token_ids: list[list[int]], max_tokens: int | None,
                      logprobs: int | None) -> Prepared:
        entry = self.resolve(request.model)
        soft = entry.adapter.config.prompt_length if entry else 0
        for ids in token_ids:
            self._check_prompt(ids, soft, max_tokens, entry)
        longest = max(len(ids) for ids in token_ids)
        params = self._sampling_params(
            request, max_tokens or self.engine.max_model_len - soft - longest, logprobs)
        if entry is None:
            return Prepared(request_id, request.model, None, token_ids,
                            [{"prompt_token_ids": ids} for ids in token_ids], params, None,
                            request.return_token_ids)
        entry.requests_served += 1
        # Held until the request ends: the engine may read the adapter's slot again (a
        # preempted request is prefilled anew), so the slot is not reused before then.
        self.registry.acquire(entry)
        try:
            # Built together, the prompts of one request share one routing step.
            results = await asyncio.gather(*(
                self.routing.build(entry, ids, request.return_routing) for ids in token_ids))
        except BaseException:
            self.registry.release(entry)
            raise
        routing = [
            protocol.Routing(prompt_index=i, adapter=entry.name, expert_weights=r.expert_weights,
                             expert_probabilities=r.expert_probabilities)
            for i, r in enumerate(results)
        ] if request.return_routing else None
        return Prepared(request_id, request.model, entry, token_ids,
                        [r.engine_prompt for r in results], params, routing,
                        request.return_token_ids)

    def _check_prompt(self, ids: list[int], soft: int, max_tokens: int | None,
                      entry: AdapterEntry | None) -> None:
        if not ids:
            raise RequestError(400, "prompt is empty: it must hold at least one token",
                               param="prompt")
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"token id {bad} is out of range: the vocabulary has "
                                    f"{vocab} tokens", param="prompt")
        limit = self.engine.max_model_len
        soft_text = f" and {soft} soft-prompt positions of adapter '{entry.name}'" if entry else ""
        if len(ids) + soft >= limit:
            raise RequestError(
                400, f"This model's maximum context length is {limit} tokens. However, your "
                     f"prompt has {len(ids)} tokens{soft_text} ({len(ids) + soft} in all), "
                     "which leaves no room to generate. Please shorten the prompt.",
                code="context_length_exceeded", param="prompt")
        if max_tokens is not None and len(ids) + soft + max_tokens > limit:
            raise RequestError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                     f"requested {len(ids) + soft + max_tokens} tokens ({len(ids)} in the "
                     f"prompt{soft_text}, {max_tokens} in the completion). Please reduce the "
                     "length of the prompt or of max_tokens.",
                code="context_length_exceeded", param="max_tokens")

    def _sampling_params(self, request: protocol.SamplingFields, max_tokens: int,
                         logprobs: int | None) -> SamplingParams:
        optional = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "repetition_penalty": request.repetition_penalty,
            "seed": request.seed,
            "stop": request.stop,
            "stop_token_ids": request.stop_token_ids,
            "logprobs": logprobs,
        }
        try:
            return SamplingParams(
                n=request.n,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                ignore_eos=request.ignore_eos,
                output_kind=RequestOutputKind.DELTA if request.stream
                else RequestOutputKind.FINAL_ONLY,
                **{k: v for k, v in optional.items() if v is not None},
            )
        except (ValueError, VLLMValidationError) as e:
            raise RequestError(400, str(e)) from None

    # -- generating -----------------------------------------------------------------------

    async def generate(self, prepared: Prepared) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all prompts as they come, tagged with the prompt's index."""
        self.metrics.requests_running.inc()
        first_token_seen = False
        label = prepared.adapter_label
        try:
            streams = [
                self.engine.generate(prompt, prepared.params, f"{prepared.request_id}-{i}")
                for i, prompt in enumerate(prepared.engine_prompts)
            ]
            async for i, output in _client_errors_as_request_errors(merge_async_iterators(*streams)):
                if not first_token_seen and any(o.token_ids for o in output.outputs):
                    first_token_seen = True
                    self.metrics.time_to_first_token.labels(label).observe(
                        time.perf_counter() - prepared.started)
                self.metrics.generation_tokens.labels(label).inc(
                    sum(len(o.token_ids) for o in output.outputs))
                yield i, output
            self.metrics.prompt_tokens.labels(label).inc(sum(map(len, prepared.token_ids)))
            self.metrics.e2e_latency.labels(label).observe(time.perf_counter() - prepared.started)
        finally:
            self.metrics.requests_running.dec()
            if prepared.entry is not None:
                self.registry.release(prepared.entry)

    # -- shaping responses ----------------------------------------------------------------

    def usage(self, prepared: Prepared, completion_tokens: int) -> protocol.Usage:
        prompt_tokens = sum(map(len, prepared.token_ids)) * prepared.params.n
        return protocol.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            soft_prompt_tokens=prepared.soft_prompt_length * len(prepared.token_ids)
            * prepared.params.n,
        )

    def completion_choice(self, prepared: Prepared, prompt_index: int, output: CompletionOutput,
                          prefix: str = "") -> protocol.CompletionChoice:
        logprobs = None
        if prepared.params.logprobs is not None and output.logprobs is not None:
            logprobs = completion_logprobs(output, prepared.params.logprobs, len(prefix))
        with_ids = prepared.return_token_ids
        return protocol.CompletionChoice(
            index=prompt_index * prepared.params.n + output.index,
            text=prefix + output.text,
            logprobs=logprobs,
            finish_reason=output.finish_reason,
            prompt_token_ids=prepared.token_ids[prompt_index] if with_ids else None,
            token_ids=list(output.token_ids) if with_ids else None,
        )

    def chat_logprobs(self, prepared: Prepared, output: CompletionOutput) -> protocol.ChatLogprobs | None:
        if prepared.params.logprobs is None or output.logprobs is None:
            return None
        content = []
        for token_id, candidates in zip(output.token_ids, output.logprobs):
            chosen = candidates[token_id]
            top = sorted(top_candidates(candidates, prepared.params.logprobs), key=lambda c: c.rank)
            content.append(protocol.TokenLogprob(
                token=chosen.decoded_token or "", logprob=max(chosen.logprob, -9999.0),
                bytes=list((chosen.decoded_token or "").encode()),
                top_logprobs=[protocol.TopLogprob(token=c.decoded_token or "",
                                                  logprob=max(c.logprob, -9999.0),
                                                  bytes=list((c.decoded_token or "").encode()))
                              for c in top],
            ))
        return protocol.ChatLogprobs(content=content)


async def _client_errors_as_request_errors(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    """The engine's own refusals of a request are the client's errors, not the server's."""
    try:
        async for item in outputs:
            yield item
    except VLLMClientError as e:
        raise RequestError(400, str(e)) from None


def top_candidates(candidates: dict, k: int) -> list:
    """vLLM returns the sampled token and the k most likely; keep the k most likely."""
    return [c for c in candidates.values() if c.rank is not None and 1 <= c.rank <= k]


def completion_logprobs(output: CompletionOutput, k: int, offset: int) -> protocol.CompletionLogprobs:
    result = protocol.CompletionLogprobs()
    for token_id, candidates in zip(output.token_ids, output.logprobs):
        chosen = candidates[token_id]
        text = chosen.decoded_token or ""
        result.tokens.append(text)
        result.token_logprobs.append(max(chosen.logprob, -9999.0))
        result.top_logprobs.append({
            (c.decoded_token or ""): max(c.logprob, -9999.0)
            for c in top_candidates(candidates, k)
        } or None)
        result.text_offset.append(offset)
        offset += len(text)
    return result
