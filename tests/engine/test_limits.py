import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from ptmoe_serve.engine.limits import RequestLimits, prompt_count

LIMITS = RequestLimits(max_model_len=1024, vocab_size=1000, max_sequences=8,
                       max_logprobs=10_000)


@pytest.mark.parametrize("prompt, count", [
    ("text", 1), ([1, 2, 3], 1), (["a", "b"], 2), ([[1], [2], [3]], 3), ([], 1)])
def test_prompt_count(prompt, count):
    assert prompt_count(prompt) == count


def test_sequences_are_prompts_times_n():
    LIMITS.check_prompts(4, 2)
    with pytest.raises(VLLMValidationError, match="5 prompts x n=2 = 10 sequences"):
        LIMITS.check_prompts(5, 2)


@pytest.mark.parametrize("params, prompt_tokens, refused", [
    (dict(n=2, max_tokens=100, logprobs=20), 0, False),  # 2 x 100 x 21 = 4,200
    (dict(n=8, max_tokens=100, logprobs=20), 0, True),  # 16,800
    (dict(max_tokens=10, logprobs=-1), 0, True),  # -1: the whole vocabulary, 10 x 1,001
    (dict(max_tokens=1, prompt_logprobs=5), 1000, False),  # 6,000
    (dict(max_tokens=1, prompt_logprobs=20), 1000, True),  # 21,000
    (dict(n=8, max_tokens=1000), 1000, False),  # no logprobs asked for
    (dict(n=9, max_tokens=1), 0, True),
    (dict(stop=["x" * 256]), 0, False),
    (dict(stop=["ok", "x" * 257]), 0, True),
])
def test_one_engine_request(params, prompt_tokens, refused):
    if refused:
        with pytest.raises(VLLMValidationError):
            LIMITS.check(SamplingParams(**params), prompt_tokens)
    else:
        LIMITS.check(SamplingParams(**params), prompt_tokens)
