"""Training examples from JSONL: each line is {"prompt": str, "answer": str} (plain text) or
{"messages": [...]} whose last message is the assistant's answer (chat, through the model's
chat template). Tokenized to the exact ids the server reads, with the answer's positions
marked for the loss. Every answer ends with the end-of-sequence token, so that the
adapter learns to stop where the answer does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # what routing reads: everything before the answer
    answer_ids: list[int]  # what the loss is on


def encode_example(record: dict, tokenizer) -> Example:
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat example must end with the assistant's answer")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    elif "prompt" in record and "answer" in record:
        prompt_ids = tokenizer.encode(record["prompt"])
        answer_ids = tokenizer.encode(record["answer"], add_special_tokens=False)
    else:
        raise ValueError("each line needs 'prompt' and 'answer', or 'messages'")
    if not prompt_ids or not answer_ids:
        raise ValueError("empty prompt or answer")
    answer_ids.append(tokenizer.eos_token_id)  # the answer is all there is: learn to stop
    return Example(prompt_ids, answer_ids)


def load_examples(path: Path, tokenizer) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                examples.append(encode_example(json.loads(line), tokenizer))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples
