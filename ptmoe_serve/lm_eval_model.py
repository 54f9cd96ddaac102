"""lm-evaluation-harness against this server, with log-likelihood requests routed as training
routes: on the context alone.

In a log-likelihood request the prompt is context + continuation, but an adapter's router was
trained on the input before the answer. `ptmoe-completions` is lm-eval's `local-completions`
that tells the server, per request, how many leading tokens the router reads
(`vllm_xargs.ptmoe_route_tokens` = the context's length): every option of a multiple-choice
question is scored under the same soft prompt, and the options share its prefix cache.

    python -m ptmoe_serve.lm_eval_model run --model ptmoe-completions \\
        --model_args model=arithmetic,base_url=http://127.0.0.1:8000/v1/completions \\
        --tasks ...

(`lm_eval --model local-completions` works against the server too, routing on context and
continuation together.) One prompt per log-likelihood request (lm-eval's default batch size
of 1; use num_concurrent for throughput)."""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI

from ptmoe_serve.config import ROUTE_TOKENS


@register_model("ptmoe-completions")
class PtMoeCompletions(LocalCompletionsAPI):
    _context_lengths: list[int] = []

    def batch_loglikelihood_requests(self, chunks):
        # One request at a time: the payload that follows is this batch's.
        inputs, context_lengths, keys = super().batch_loglikelihood_requests(chunks)
        self._context_lengths = context_lengths
        return inputs, context_lengths, keys

    async def amodel_call(self, *args, ctxlens=None, **kwargs):
        # Concurrent requests: each call carries its own context lengths.
        return await super().amodel_call(*args, ctxlens=ctxlens, context_lengths=ctxlens,
                                         **kwargs)

    def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None,
                        context_lengths=None, **kwargs) -> dict:
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs,
                                          seed=seed, eos=eos, **kwargs)
        if not generate:
            lengths = context_lengths or self._context_lengths
            if len(lengths) != 1:
                raise ValueError("ptmoe-completions sends one log-likelihood prompt per "
                                 "request: use batch_size=1 (and num_concurrent for speed)")
            payload["vllm_xargs"] = {ROUTE_TOKENS: lengths[0]}
        return payload


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
