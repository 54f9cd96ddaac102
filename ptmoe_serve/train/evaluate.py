"""`ptmoe-serve eval`: run a JSONL test set through a running server and score the answers.

Each line is {"prompt", "answer"} (sent as a completion) or {"messages": [..., answer]} (sent
as a chat), greedy decoding, or a multiple-choice question {"prompt", "choices", "answer":
index}. Metrics: exact match and token F1 after SQuAD-style normalisation (QA), answer
accuracy: the last number in the output equals the reference's (math), and choice accuracy:
the choice of highest log-likelihood after the prompt is the answer, with the router reading
the prompt alone, as in training (`vllm_xargs.ptmoe_route_tokens`)."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import string

import httpx

from ptmoe_serve.config import ROUTE_TOKENS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if not predicted or not expected:
        return float(predicted == expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def last_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def answer_accuracy(prediction: str, reference: str) -> float:
    expected = last_number(reference)
    return float(expected is not None and last_number(prediction) == expected)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {
        "examples": n,
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "answer_accuracy": sum(map(answer_accuracy, predictions, references)) / n,
    }


async def predict(url: str, model: str, records: list[dict], max_tokens: int,
                  concurrency: int = 8, api_key: str | None = None) -> list[str]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        async def one(record: dict) -> str:
            async with limit:
                if "messages" in record:
                    # A training line's `weight`s are the trainer's, not the chat's.
                    messages = [{k: v for k, v in m.items() if k != "weight"}
                                for m in record["messages"][:-1]]
                    response = await client.post("/v1/chat/completions", json={
                        "model": model, "messages": messages,
                        "max_tokens": max_tokens, "temperature": 0})
                    response.raise_for_status()
                    return response.json()["choices"][0]["message"]["content"]
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": record["prompt"], "max_tokens": max_tokens,
                    "temperature": 0, "stop": ["\n"]})
                response.raise_for_status()
                return response.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(r) for r in records))


async def choose(url: str, model: str, records: list[dict], concurrency: int = 8,
                 api_key: str | None = None) -> list[int]:
    """Each question's choice of highest log-likelihood (summed over its tokens)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        async def tokens(text: str, add_special_tokens: bool = True) -> list[int]:
            response = await client.post("/tokenize", json={
                "model": model, "prompt": text, "add_special_tokens": add_special_tokens})
            response.raise_for_status()
            return response.json()["tokens"]

        async def loglikelihood(context: list[int], choice: str) -> float:
            continuation = await tokens(choice, add_special_tokens=False)
            async with limit:
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": context + continuation, "max_tokens": 1,
                    "temperature": 0, "echo": True, "logprobs": 0,
                    "vllm_xargs": {ROUTE_TOKENS: len(context)}})
            response.raise_for_status()
            scores = response.json()["choices"][0]["logprobs"]["token_logprobs"]
            return sum(scores[len(context):len(context) + len(continuation)])

        async def one(record: dict) -> int:
            context = await tokens(record["prompt"])
            scores = await asyncio.gather(*(loglikelihood(context, c) for c in record["choices"]))
            return max(range(len(scores)), key=scores.__getitem__)

        return await asyncio.gather(*(one(r) for r in records))


def reference_of(record: dict) -> str:
    return record["messages"][-1]["content"] if "messages" in record else record["answer"]


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_models(url: str, models: list[str], records: list[dict], max_tokens: int,
                    concurrency: int = 8, api_key: str | None = None) -> dict[str, dict]:
    """One row of scores per model (adapter or base model name), all on the same records."""
    questions = [r for r in records if "choices" in r]
    generated = [r for r in records if "choices" not in r]
    references = [reference_of(r) for r in generated]
    results = {}
    for model in models:
        row = {}
        if generated:
            row = score(asyncio.run(predict(url, model, generated, max_tokens, concurrency,
                                            api_key)), references)
        if questions:
            chosen = asyncio.run(choose(url, model, questions, concurrency, api_key))
            row["choice_examples"] = len(questions)
            row["choice_accuracy"] = sum(c == q["answer"] for c, q in zip(chosen, questions)) \
                / len(questions)
        results[model] = row
    return results


def format_table(results: dict[str, dict]) -> str:
    columns = [("examples", "n", "{:>5}"), ("exact_match", "exact", "{:>7.3f}"),
               ("token_f1", "F1", "{:>7.3f}"), ("answer_accuracy", "accuracy", "{:>9.3f}"),
               ("choice_examples", "choices n", "{:>10}"),
               ("choice_accuracy", "choice acc", "{:>11.3f}")]
    shown = [c for c in columns if any(c[0] in row for row in results.values())]
    header = f"{'model':<32}" + "".join(f" {title:>{len(fmt.format(0))}}"
                                         for _, title, fmt in shown)
    lines = [header]
    for model, row in results.items():
        lines.append(f"{model:<32}" + "".join(" " + fmt.format(row[key]) if key in row else ""
                                             for key, _, fmt in shown))
    return "\n".join(lines)
