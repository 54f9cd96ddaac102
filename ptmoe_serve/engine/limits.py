"""What one request may cost, beyond vLLM's own bounds (prompts per request:
VLLM_MAX_COMPLETION_PROMPTS; stop strings per request: VLLM_MAX_STOP_STRINGS; `seed` within
int64; logprobs per token: --max-logprobs; the prompt within --max-model-len).

Checked before anything is rendered or queued: a request over a bound gets a 400 naming the
bound and the option that sets it."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

# The stop strings are searched for in the tail of every sequence's text at every token.
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    # Sequences one request may ask for: prompts x n.
    max_sequences: int
    # Logprob entries one engine request may return: sequences x tokens x (logprobs + 1),
    # generated and prompt tokens both (each entry is a few Python objects in this process).
    max_logprobs: int

    def check_prompts(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_sequences:
            raise VLLMValidationError(
                f"the request asks for {prompts} prompts x n={n} = {prompts * n} sequences; "
                f"the limit is {self.max_sequences} (--max-sequences-per-request): send fewer "
                "prompts per request", parameter="prompt" if prompts > 1 else "n")

    def check(self, params: SamplingParams, prompt_tokens: int) -> None:
        """One engine request (one prompt), before it is routed or queued."""
        self.check_prompts(1, params.n)
        for stop in params.stop or ():
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise VLLMValidationError(
                    f"a stop string of {len(stop)} characters is over the limit of "
                    f"{MAX_STOP_STRING_CHARS}", parameter="stop")
        entries = 0
        if params.logprobs is not None:
            tokens = params.max_tokens or self.max_model_len
            entries += params.n * tokens * (self._per_token(params.logprobs) + 1)
        if params.prompt_logprobs is not None:
            entries += prompt_tokens * (self._per_token(params.prompt_logprobs) + 1)
        if entries > self.max_logprobs:
            raise VLLMValidationError(
                f"the request would return up to {entries} logprobs (n x max_tokens x "
                f"(logprobs + 1), prompt logprobs included); the limit is {self.max_logprobs} "
                "(--max-logprobs-per-request): lower n, max_tokens or logprobs",
                parameter="logprobs")

    def _per_token(self, logprobs: int) -> int:
        return self.vocab_size if logprobs == -1 else logprobs  # -1: the whole vocabulary


def prompt_count(prompt) -> int:
    """How many prompts a completions `prompt` field holds."""
    if isinstance(prompt, str) or not isinstance(prompt, list) or not prompt:
        return 1
    return 1 if isinstance(prompt[0], int) else len(prompt)
