"""What a training run and a fine-tuning job ask for, written once: the adapter's shape, the
trainer's settings and OpenAI's hyperparameters, with their bounds, defaults and meaning.

The fine-tuning API validates a job's request with these models, the worker reads a job's record
with them, and the command line builds its options from their fields (cli.py). Plain data: no
torch, no vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ptmoe_serve.adapters.config import MAX_EXPERTS, MAX_RANK, AdapterConfig, RouteScope

MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
MAX_LEARNING_RATE_MULTIPLIER = 100.0
# The trainer's rate for learning_rate_multiplier 1.
BASE_LEARNING_RATE = 3e-3
# "auto": enough epochs for about this many examples seen, within 1..10; batches of this many.
AUTO_EXAMPLES_SEEN = 800
AUTO_BATCH_SIZE = 8
DEFAULT_TASK_TEXT = "Answer as the examples answer."
MAX_TASK_TEXT = 4000


class AdapterShape(BaseModel):
    """A PT-MoE adapter's shape and routing; the defaults are the paper's (N=2, T=40, R=36,
    top-1 with probability scaling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(2, ge=1, le=MAX_EXPERTS,
                             description="experts N; 1 is plain prompt tuning (no router)")
    prompt_length: int = Field(40, ge=1, description="soft-prompt positions T")
    rank: int = Field(36, ge=1, le=MAX_RANK,
                      description="rank R of the experts' matrices A [T, R] and the shared B")
    top_k: int = Field(1, ge=1, le=MAX_EXPERTS, description="experts each prompt uses")
    router_scaling: Literal["probability", "none"] = Field(
        "probability", description="kept experts weighted by their router probability, or 1")
    # first_turn: on the multi-turn task it scored within 2 points of prompt, each trained
    # under its own scope (BENCHMARKS.md, "Conversations"), and a chat's later turns come
    # from the prefix cache.
    route_scope: RouteScope = Field(
        "first_turn", description="what the router reads of a chat: turn 1's prompt (a "
                                  "conversation's later turns reuse the prefix cache), or the "
                                  "whole prompt; a completion is routed on its whole prompt")

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> AdapterShape:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} is more than num_experts {self.num_experts}")
        return self

    def adapter_config(self, base_model: str, hidden_size: int) -> AdapterConfig:
        """The format v1 config of an adapter of this shape over that base model (raises
        pydantic's ValidationError where the adapter would be too large)."""
        return AdapterConfig.v1(base_model, hidden_size=hidden_size,
                                **self.model_dump(include=set(AdapterShape.model_fields)))


class TrainSettings(AdapterShape):
    """One training run (`ptmoe-serve train`, and each fine-tuning job through the worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_dir: Path = Field(description="the frozen base model's folder")
    base_name: str = Field(description="the base model's name, written into the adapter")
    data: Path = Field(description='JSONL: {"prompt", "completion"} or {"messages": [...]}')
    output: Path = Field(description="the adapter folder to write (and its checkpoint)")
    task_text: str = Field(description="the task description the prompt is initialised from "
                                       "(the paper's SVD initialisation)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(BASE_LEARNING_RATE, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    noise_std: float = Field(0.01, ge=0,
                             description="multiplicative noise on router logits while training")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    resume: bool = Field(False, description="continue from the output folder's checkpoint")
    method: Literal["ptmoe", "lora"] = Field(
        "ptmoe", description="lora: the LoRA baseline of about the same parameter count, in "
                             "PEFT's format (served by vLLM's multi-LoRA)")
    lora_rank: int | None = Field(None, ge=1, description="default: the rank whose parameter "
                                                          "count is closest to PT-MoE's")
    lora_targets: tuple[str, ...] = ("q_proj",)
    device: str = Field("cpu", description="where PT-MoE training runs: cpu, cuda, cuda:1, ...")


def _within(name: str, value, low, high, low_open: bool = False):
    """`value` unless it is a number outside [low, high] ((low, high] with `low_open`)."""
    if value == "auto":
        return value
    if (value <= low if low_open else value < low) or value > high:
        raise ValueError(f"{name} must be {'above ' if low_open else ''}{low} to {high}")
    return value


class Hyperparameters(BaseModel):
    """OpenAI's fine-tuning hyperparameters, each "auto" by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: Literal["auto"] | int = "auto"
    batch_size: Literal["auto"] | int = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value):
        return _within("n_epochs", value, 1, MAX_EPOCHS)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value):
        return _within("batch_size", value, 1, MAX_BATCH_SIZE)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _rate(cls, value):
        return _within("learning_rate_multiplier", value, 0, MAX_LEARNING_RATE_MULTIPLIER,
                       low_open=True)

    def resolved(self, examples: int) -> Hyperparameters:
        """These, with each "auto" replaced by what the data calls for."""
        auto = {"n_epochs": max(1, min(10, round(AUTO_EXAMPLES_SEEN / examples))),
                "batch_size": min(AUTO_BATCH_SIZE, examples), "learning_rate_multiplier": 1.0}
        return Hyperparameters(**{name: default if getattr(self, name) == "auto"
                                  else getattr(self, name) for name, default in auto.items()})


class JobAdapter(AdapterShape):
    """The adapter a fine-tuning job trains: its shape and the text its prompt starts from."""

    task_text: str | None = Field(None, max_length=MAX_TASK_TEXT,
                                  description="the task description the prompt is "
                                              "initialised from")
