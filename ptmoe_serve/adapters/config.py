"""An adapter's config (`adapter_config.json` of format v1), its name, and the limits on both:
plain data, no torch, so that what only describes adapters (the command line, a fine-tuning
job's request) need not load the tensor stack."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

MAX_NAME_LENGTH = 128
# Far above any PT-MoE adapter (the paper's: 2-8 experts, rank 36, tens of thousands of
# parameters), low enough that one folder or upload cannot claim gigabytes of bank memory.
MAX_EXPERTS = 256
MAX_RANK = 4096
MAX_PARAMETERS = 1 << 25
# Matched against the whole name (fullmatch): "$" alone would let a trailing newline through.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What the router reads of a chat (routing/scope.py): the whole prompt, or turn 1's.
RouteScope = Literal["prompt", "first_turn"]


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why, and `field` names the config
    field at fault where there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class AdapterConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: Literal["PT_MOE"]
    format_version: Literal[1]
    base_model_name_or_path: str
    hidden_size: PositiveInt
    num_experts: PositiveInt = Field(le=MAX_EXPERTS)
    prompt_length: PositiveInt
    rank: PositiveInt = Field(le=MAX_RANK)
    top_k: PositiveInt
    router_scaling: Literal["probability", "none"]
    route_scope: RouteScope = "prompt"

    @model_validator(mode="after")
    def _bounded(self) -> AdapterConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.num_parameters > MAX_PARAMETERS:
            raise ValueError(f"the adapter would have {self.num_parameters} parameters; the "
                             f"limit is {MAX_PARAMETERS}")
        return self

    @classmethod
    def v1(cls, base_model_name_or_path: str, *, hidden_size: int, num_experts: int,
           prompt_length: int, rank: int, top_k: int, router_scaling: str,
           route_scope: str = "prompt") -> AdapterConfig:
        """A format v1 config: how every new adapter's config is made (the command line,
        the PEFT import, training)."""
        return cls(peft_type="PT_MOE", format_version=1,
                   base_model_name_or_path=base_model_name_or_path, hidden_size=hidden_size,
                   num_experts=num_experts, prompt_length=prompt_length, rank=rank,
                   top_k=top_k, router_scaling=router_scaling, route_scope=route_scope)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        n, t, r, h = self.num_experts, self.prompt_length, self.rank, self.hidden_size
        return {
            "experts.A": (n, t, r),
            "shared.B": (r, h),
            "router.weight": (n, h),
            "router.bias": (n,),
        }

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to {MAX_NAME_LENGTH} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit, without '..'"
        )
    return name


def problems(error: ValidationError) -> str:
    """A pydantic error's problems in one line, each with the field it is about."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                     for err in error.errors())
