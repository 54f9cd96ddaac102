"""Training examples from JSONL, in OpenAI's fine-tuning formats: {"messages": [...]} ending
with an assistant message (chat, through the model's chat template; system messages kept), or
{"prompt": str, "completion": str} (plain text; "answer" is taken for "completion" too).

A chat line gives one example for each assistant message it trains: every assistant message
with `weight` 1, the default (0 leaves it out; OpenAI's format). Each example's prompt is every
message before its answer, as the server renders that turn, and is routed as the server routes
it under the adapter's scope (routing/scope.py): all of it, or turn 1's prompt. Tokenized to the
exact ids the server reads; every answer ends with the end-of-sequence token, so that the
adapter learns to stop where the answer does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptmoe_serve.routing.scope import first_turn, routed_length

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # everything before the answer
    answer_ids: list[int]  # what the loss is on
    route_tokens: int  # the router reads prompt_ids[:route_tokens]


def encode_examples(record: dict, tokenizer, route_scope: str = "prompt") -> list[Example]:
    """The examples of one line, routed under `route_scope`."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in record:
        return _chat_examples(record["messages"], tokenizer, route_scope)
    if "prompt" in record and ("completion" in record or "answer" in record):
        answer = record["completion"] if "completion" in record else record["answer"]
        prompt_ids = tokenizer.encode(_text(record["prompt"], "prompt"))
        return [_example(prompt_ids, _text(answer, "completion"), len(prompt_ids), tokenizer)]
    raise ValueError("each line needs 'messages', or 'prompt' and 'completion'")


def _chat_examples(raw: list, tokenizer, route_scope: str) -> list[Example]:
    messages = [_message(m, i) for i, m in enumerate(_list(raw))]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a chat example must end with an assistant message")
    problem = weight_problem(raw)
    if problem:
        raise ValueError(problem)
    turn_one = first_turn(messages) if route_scope == "first_turn" else None
    turn_one_ids = _rendered(turn_one, tokenizer) if turn_one else []
    examples = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or raw[i].get("weight", 1) == 0:
            continue
        if i == 0:
            raise ValueError("message 0: an assistant message needs a message before it")
        prompt_ids = _rendered(messages[:i], tokenizer)
        route_tokens = routed_length(prompt_ids, turn_one_ids) or len(prompt_ids)
        examples.append(_example(prompt_ids, message["content"], route_tokens, tokenizer))
    return examples


def weight_problem(messages: object) -> str | None:
    """What is wrong with a chat line's `weight`s (OpenAI's: 0 or 1, on assistant messages,
    1 by default), or None; checked at upload too, so it takes any JSON."""
    if not isinstance(messages, list):
        return None
    weights = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        weight = message.get("weight", 1)
        if "weight" in message and message.get("role") != "assistant":
            return (f"message {i}: weight is taken on assistant messages only; this one's "
                    f"role is {message.get('role')!r}")
        if isinstance(weight, bool) or weight not in (0, 1):
            return f"message {i}: weight must be 0 or 1; got {weight!r}"
        if message.get("role") == "assistant":
            weights.append(weight)
    if weights and not any(weights):
        return "every assistant message has weight 0: the example trains nothing"
    return None


def _rendered(messages: list[dict], tokenizer) -> list[int]:
    """The prompt the server renders for the turn after `messages`."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _example(prompt_ids: list[int], answer: str, route_tokens: int, tokenizer) -> Example:
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    if not prompt_ids or not answer_ids:
        raise ValueError("empty prompt or answer")
    answer_ids.append(tokenizer.eos_token_id)  # the answer is all there is: learn to stop
    return Example(prompt_ids, answer_ids, route_tokens)


def _list(value) -> list:
    if not isinstance(value, list):
        raise ValueError("'messages' must be a list")
    return value


def _message(message, index: int) -> dict:
    """A message as the chat template takes it: a role, and text content (OpenAI's text
    parts joined)."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ValueError(f"message {index} needs a role, one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"message {index}: only text content parts are taken")
        content = "".join(p["text"] for p in content)
    return {"role": message["role"], "content": _text(content, f"message {index} content")}


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


class BadExample(ValueError):
    """A line that is not an example, with its number."""

    def __init__(self, line: int, problem: str):
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


def read_examples(path: Path, tokenizer, route_scope: str = "prompt") -> list[Example]:
    """Every example of a JSONL file; a BadExample for the first line that is not one."""
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                examples.extend(encode_examples(json.loads(line), tokenizer, route_scope))
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise BadExample(number, str(e)) from None
    if not examples:
        raise BadExample(0, "the file holds no examples")
    return examples


def load_examples(path: Path, tokenizer, route_scope: str = "prompt") -> list[Example]:
    try:
        return read_examples(path, tokenizer, route_scope)
    except BadExample as e:
        raise ValueError(f"{path}:{e.line}: {e.problem}") from None
