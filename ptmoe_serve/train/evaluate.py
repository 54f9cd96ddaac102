"""`ptmoe-serve eval`: run a JSONL test set through a running server and score the answers.

Each line is {"prompt", "answer"} (sent as a completion) or {"messages": [..., answer]} (sent
as a chat); greedy decoding. Metrics: exact match and token F1 after SQuAD-style normalisation
(QA), and answer accuracy: the last number in the output equals the reference's (math)."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import string

import httpx

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
                    response = await client.post("/v1/chat/completions", json={
                        "model": model, "messages": record["messages"][:-1],
                        "max_tokens": max_tokens, "temperature": 0})
                    response.raise_for_status()
                    return response.json()["choices"][0]["message"]["content"]
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": record["prompt"], "max_tokens": max_tokens,
                    "temperature": 0, "stop": ["\n"]})
                response.raise_for_status()
                return response.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(r) for r in records))


def reference_of(record: dict) -> str:
    return record["messages"][-1]["content"] if "messages" in record else record["answer"]


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_models(url: str, models: list[str], records: list[dict], max_tokens: int,
                    concurrency: int = 8, api_key: str | None = None) -> dict[str, dict]:
    """One row of scores per model (adapter or base model name), all on the same records."""
    references = [reference_of(r) for r in records]
    return {model: score(asyncio.run(predict(url, model, records, max_tokens, concurrency,
                                             api_key)), references)
            for model in models}


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'model':<32} {'n':>5} {'exact':>7} {'F1':>7} {'accuracy':>9}"]
    for model, row in results.items():
        lines.append(f"{model:<32} {row['examples']:>5} {row['exact_match']:>7.3f} "
                     f"{row['token_f1']:>7.3f} {row['answer_accuracy']:>9.3f}")
    return "\n".join(lines)
