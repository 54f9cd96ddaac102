"""Training examples from JSONL, in OpenAI's fine-tuning formats: {"messages": [...]} whose
last message is the assistant's answer (chat, through the model's chat template; system
messages kept), or {"prompt": str, "completion": str} (plain text; "answer" is taken for
"completion" too). Tokenized to the exact ids the server reads, with the answer's positions
marked for the loss. Every answer ends with the end-of-sequence token, so that the adapter
learns to stop where the answer does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # what routing reads: everything before the answer
    answer_ids: list[int]  # what the loss is on


def encode_example(record: dict, tokenizer) -> Example:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in record:
        messages = [_message(m, i) for i, m in enumerate(_list(record["messages"]))]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a chat example must end with the assistant's answer")
        if len(messages) < 2:
            raise ValueError("a chat example needs a message before the assistant's answer")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    elif "prompt" in record and ("completion" in record or "answer" in record):
        answer = record["completion"] if "completion" in record else record["answer"]
        prompt_ids = tokenizer.encode(_text(record["prompt"], "prompt"))
        answer_ids = tokenizer.encode(_text(answer, "completion"), add_special_tokens=False)
    else:
        raise ValueError("each line needs 'messages', or 'prompt' and 'completion'")
    if not prompt_ids or not answer_ids:
        raise ValueError("empty prompt or answer")
    answer_ids.append(tokenizer.eos_token_id)  # the answer is all there is: learn to stop
    return Example(prompt_ids, answer_ids)


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


def read_examples(path: Path, tokenizer) -> list[Example]:
    """Every example of a JSONL file; a BadExample for the first line that is not one."""
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                examples.append(encode_example(json.loads(line), tokenizer))
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise BadExample(number, str(e)) from None
    if not examples:
        raise BadExample(0, "the file holds no examples")
    return examples


def load_examples(path: Path, tokenizer) -> list[Example]:
    try:
        return read_examples(path, tokenizer)
    except BadExample as e:
        raise ValueError(f"{path}:{e.line}: {e.problem}") from None
