"""The task adapters shipped in adapters/ do their task: served by the server, on the start of
each task's held-out split, each scores clearly above the base model (the whole held-out sets,
with the baselines, are in bench/results/quality.json and the README)."""

import json

import pytest

from conftest import BASE, REPO_ADAPTERS
from ptmoe_serve.train.evaluate import evaluate_models
from ptmoe_serve.train.tasks import METRICS, TASKS, generate

EXAMPLES = 24


@pytest.mark.parametrize("task", list(TASKS))
def test_shipped_adapter_beats_the_base_model_on_held_out_examples(task, server):
    training = json.loads((REPO_ADAPTERS / task / "training.json").read_text())
    assert training["steps"] > 0
    # The held-out split's first examples (its people never occur in the training split).
    records = generate(task, "test", EXAMPLES)
    scores = evaluate_models(server.url, [BASE, task], records, max_tokens=48)
    metric = METRICS[task]
    assert scores[task][metric] >= scores[BASE][metric] + 0.3, scores
