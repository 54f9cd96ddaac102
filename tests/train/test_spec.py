"""The one specification of a training run and a fine-tuning job (train/spec.py): its bounds
and their messages, "auto" resolved from the data, and the command line built from it."""

import pytest
from pydantic import ValidationError

from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.cli import main
from ptmoe_serve.train.spec import AdapterShape, Hyperparameters, JobAdapter, TrainSettings


@pytest.mark.parametrize("fields, message", [
    ({"n_epochs": 0}, "n_epochs must be 1 to 50"),
    ({"n_epochs": 51}, "n_epochs must be 1 to 50"),
    ({"batch_size": 257}, "batch_size must be 1 to 256"),
    ({"learning_rate_multiplier": 0}, "learning_rate_multiplier must be above 0 to 100"),
    ({"warmup": 3}, "Extra inputs are not permitted"),
])
def test_hyperparameters_out_of_bounds_are_refused_naming_the_bound(fields, message):
    with pytest.raises(ValidationError, match=message):
        Hyperparameters(**fields)


def test_auto_is_resolved_from_the_data_and_given_values_stay():
    assert Hyperparameters(batch_size=2, learning_rate_multiplier=0.5).resolved(50) == \
        Hyperparameters(n_epochs=10, batch_size=2, learning_rate_multiplier=0.5)
    assert Hyperparameters(n_epochs=3).resolved(5).batch_size == 5


def test_an_adapter_shape_is_checked_once_for_every_front_door():
    with pytest.raises(ValidationError, match="top_k 3 is more than num_experts 2"):
        JobAdapter(top_k=3)
    with pytest.raises(ValidationError, match="num_experts"):
        AdapterShape(num_experts=1000)
    # The paper's shape by default, routed on a chat's first turn (chosen on the multi-turn
    # task), and the config an adapter of it is written with.
    assert AdapterShape().adapter_config("base", 576) == AdapterConfig.v1(
        "base", hidden_size=576, num_experts=2, prompt_length=40, rank=36, top_k=1,
        router_scaling="probability", route_scope="first_turn")
    with pytest.raises(ValidationError, match="parameters; the limit is"):
        AdapterShape(prompt_length=100_000, rank=4096).adapter_config("base", 576)


def test_the_command_line_takes_its_options_and_defaults_from_the_spec(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("ptmoe_serve.cli._resolve_model", lambda model, cache: (tmp_path, "m"))
    monkeypatch.setattr("ptmoe_serve.train.trainer.train",
                        lambda settings: seen.setdefault("settings", settings) and
                        {"losses": [1.0, 0.5]})
    main(["train", "--data", "d.jsonl", "--output", str(tmp_path / "out"), "--task-text", "t",
          "--rank", "8", "--lora-targets", "q_proj", "v_proj"])
    expected = TrainSettings(model_dir=tmp_path, base_name="m", data="d.jsonl",
                             output=tmp_path / "out", task_text="t", rank=8,
                             lora_targets=("q_proj", "v_proj"))
    assert seen["settings"] == expected
    with pytest.raises(SystemExit, match="top_k 3 is more than num_experts 2"):
        main(["train", "--data", "d.jsonl", "--output", str(tmp_path / "out"),
              "--task-text", "t", "--top-k", "3"])
