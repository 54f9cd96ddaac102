"""Evaluation metrics on hand-made cases, and `ptmoe-serve eval` against the real server."""

import json
import subprocess
import sys

import pytest

from ptmoe_serve.train.evaluate import answer_accuracy, exact_match, score, token_f1


@pytest.mark.parametrize("prediction, reference, em, f1", [
    ("Paris", "Paris", 1.0, 1.0),
    (" the Paris.", "paris", 1.0, 1.0),
    ("Paris, France", "Paris", 0.0, 2 / 3),
    ("Rome", "Paris", 0.0, 0.0),
    ("", "Paris", 0.0, 0.0),
])
def test_exact_match_and_f1(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


@pytest.mark.parametrize("prediction, reference, correct", [
    ("So the answer is 42.", "42", 1.0),
    ("5 + 3 = 8, then 8 * 2 = 16", "The total is 16", 1.0),
    ("1,250 apples", "1250", 1.0),
    ("It is 41.", "42", 0.0),
    ("no idea", "7", 0.0),
])
def test_answer_accuracy(prediction, reference, correct):
    assert answer_accuracy(prediction, reference) == correct


def test_score_averages():
    result = score(["Paris", "Rome", "12"], ["Paris", "Paris", "12"])
    assert result == {"examples": 3, "exact_match": pytest.approx(2 / 3),
                      "token_f1": pytest.approx(2 / 3), "answer_accuracy": pytest.approx(1 / 3)}


def test_eval_command_against_the_server(server, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "The capital of France is", "answer": "Paris"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                               {"role": "assistant", "content": "4"}]}) + "\n")
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "ptmoe_serve.cli", "eval", "--data", str(data),
                           "--url", server.url, "--model", "SmolLM2-135M-Instruct",
                           "--model", "top1", "--max-tokens", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"SmolLM2-135M-Instruct", "top1"}
    assert all(r["examples"] == 2 for r in results.values())
    assert "SmolLM2-135M-Instruct" in done.stdout
