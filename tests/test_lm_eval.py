"""lm-evaluation-harness against the real server, as its users run it: `local-completions`
with a generation task and a multiple-choice task of the project's own, for a shipped adapter
and the base model; and `ptmoe-completions`, which routes log-likelihood requests on their
context alone, agreeing with `ptmoe-serve eval`'s choice accuracy."""

import json
import os
import random

import pytest

from conftest import BASE
from ptmoe_serve.train.evaluate import evaluate_models
from ptmoe_serve.train.tasks import generate, passage_facts

# lm-eval reads its data sets through Hugging Face datasets: local files only here.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = 4
TASKS = """\
task: ptmoe_qa_generate
dataset_path: json
dataset_kwargs:
  data_files: {{test: {generate}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true,
     regexes_to_ignore: ["\\\\s"]}}
---
task: ptmoe_qa_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {choice}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


def extractive_qa_choice(rng: random.Random, split: str) -> dict:
    """The extractive QA task as a multiple-choice question: the choices are the passage's
    answers to all its questions, so only the question tells which span is right (scored by
    the log-likelihood of each choice after the prompt)."""
    passage, facts = passage_facts(rng, split)
    index = rng.randrange(len(facts))
    return {"prompt": f"Passage: {passage}\nQuestion: {facts[index][0]}\nAnswer:",
            "choices": [f" {answer}" for _, answer in facts], "answer": index}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random("lm-eval")
    data = {"generate": generate("extractive-qa", "test", EXAMPLES, seed=7),
            "choice": [extractive_qa_choice(rng, "test") for _ in range(EXAMPLES)]}
    paths = {}
    for name, records in data.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    for i, task in enumerate(TASKS.format(**paths).split("---\n")):
        (folder / f"task{i}.yaml").write_text(task)
    return folder, data


def lm_eval(server, model_dir, folder, model_type: str, model: str) -> dict:
    import lm_eval as harness
    from lm_eval.tasks import TaskManager

    import ptmoe_serve.lm_eval_model  # noqa: F401  (registers ptmoe-completions)

    results = harness.simple_evaluate(
        model=model_type,
        model_args=f"model={model},base_url={server.url}/v1/completions,num_concurrent=4,"
                   f"tokenizer_backend=huggingface,tokenizer={model_dir},max_retries=1",
        tasks=["ptmoe_qa_generate", "ptmoe_qa_choice"],
        # Only the project's tasks: indexing lm-eval's own thousands takes half a minute.
        task_manager=TaskManager(include_path=str(folder), include_defaults=False))["results"]
    return {"exact_match": results["ptmoe_qa_generate"]["exact_match,none"],
            "acc": results["ptmoe_qa_choice"]["acc,none"]}


def test_lm_eval_runs_generation_and_multiple_choice_for_an_adapter_and_the_base(
        server, model_dir, tasks):
    folder, data = tasks
    adapter = lm_eval(server, model_dir, folder, "local-completions", "extractive-qa")
    base = lm_eval(server, model_dir, folder, "local-completions", BASE)
    # The trained adapter answers with the span; the base model talks.
    assert adapter["exact_match"] >= 0.75 > base["exact_match"]
    assert 0 <= base["acc"] <= 1 and adapter["acc"] >= 0.5

    routed = lm_eval(server, model_dir, folder, "ptmoe-completions", "extractive-qa")
    assert routed["exact_match"] == adapter["exact_match"]
    # Both route each question on its prompt alone: the same choices, the same accuracy.
    ours = evaluate_models(server.url, ["extractive-qa"], data["choice"], max_tokens=1)
    assert routed["acc"] == pytest.approx(ours["extractive-qa"]["choice_accuracy"])
