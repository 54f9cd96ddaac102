"""The generated tasks: reproducible, held-out split apart from the training split down to
the people in it, and every answer right by construction."""

import json
import re

import pytest

from ptmoe_serve.cli import main
from ptmoe_serve.train.tasks import TASKS, generate, write_task

NAME = re.compile(r"\b([A-Z][a-z]+) ([A-Z][a-z]+)\b")


def people(records: list[dict]) -> set[str]:
    texts = [r.get("prompt") or r["messages"][0]["content"] for r in records]
    return {" ".join(m) for text in texts for m in NAME.findall(text)}


@pytest.mark.parametrize("task", list(TASKS))
def test_generation_is_reproducible_and_splits_share_no_prompt_or_person(task, tmp_path):
    assert generate(task, "train", 50, seed=3) == generate(task, "train", 50, seed=3)
    assert generate(task, "train", 50, seed=3) != generate(task, "train", 50, seed=4)
    write_task(task, tmp_path, train_size=300, test_size=60)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train) == 300 and len(test) == 60
    key = lambda r: json.dumps(r.get("prompt") or r["messages"][:-1])  # noqa: E731
    assert len({key(r) for r in train}) == 300
    assert not {key(r) for r in train} & {key(r) for r in test}
    if task != "arithmetic":  # its prompts name first names only
        assert people(test) and not people(train) & people(test)


def test_qa_answers_are_spans_of_the_passage():
    for record in generate("extractive-qa", "test", 100):
        passage = record["prompt"].split("\nQuestion:")[0]
        assert record["answer"].strip() in passage


def test_arithmetic_answers_are_right():
    for record in generate("arithmetic", "test", 100):
        working, result = record["answer"].split("=")
        numbers = [int(n) for n in re.findall(r"\d+", record["prompt"])]
        a, op, b = working.split()
        assert [int(a), int(b)] == numbers
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op] \
            == int(result)


def test_contact_cards_hold_what_the_user_said():
    for record in generate("contact-card", "test", 100):
        said, card = record["messages"][0]["content"], record["messages"][1]["content"]
        fields = dict(part.split(": ") for part in card.split(" | "))
        assert list(fields) == ["NAME", "JOB", "CITY", "PHONE"]
        assert all(value in said for value in fields.values())


def test_make_tasks_command(tmp_path, capsys):
    main(["make-tasks", "--out", str(tmp_path), "--task", "arithmetic", "--train-size", "20",
          "--test-size", "5"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arithmetic"]
    assert len((tmp_path / "arithmetic" / "test.jsonl").read_text().splitlines()) == 5


def test_multi_turn_city_asks_in_turn_two_or_three_and_its_answer_is_the_latest_turns():
    from ptmoe_serve.train.data import weight_problem

    records = generate("multi-turn-city", "test", 100)
    kinds = set()
    for record in records:
        messages = record["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        earlier = [m for m in messages[:-1] if m["role"] == "assistant"]
        answer = messages[-1]["content"]
        assert len(users) in (2, 3) and answer in users[-1]
        assert answer not in [m["content"] for m in earlier]
        assert weight_problem(messages) is None
        kinds.add(any(m.get("weight", 1) for m in earlier))
    assert kinds == {True, False}  # after another person's city, after small talk alone
