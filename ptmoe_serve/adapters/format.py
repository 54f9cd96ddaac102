"""Adapter format v1: a folder holding `adapter_config.json` and `adapter_model.safetensors`.

Everything read from disk is validated here, before a tensor reaches the device: the config
(config.py), the safetensors header by hand (so an absurd size is refused without allocating it),
then shapes, dtypes and finiteness. Pickle-based files are never opened."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError
from safetensors.torch import load, save

from ptmoe_serve.adapters.config import AdapterConfig, AdapterError, problems

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
MAX_CONFIG_BYTES = 64 * 1024
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
@dataclass(frozen=True)
class PtMoeAdapter:
    """One adapter's tensors, float32, in the layout of format v1."""

    config: AdapterConfig
    experts_a: torch.Tensor  # [N, T, R]
    shared_b: torch.Tensor  # [R, H]
    router_weight: torch.Tensor  # [N, H]
    router_bias: torch.Tensor  # [N]

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "experts.A": self.experts_a,
            "shared.B": self.shared_b,
            "router.weight": self.router_weight,
            "router.bias": self.router_bias,
        }

    def routing_only(self) -> PtMoeAdapter:
        """This adapter with its prompt weights (A, B) as shape-only meta tensors: what a
        process keeps that computes routings but never soft prompts."""
        return replace(self, experts_a=self.experts_a.to("meta"),
                       shared_b=self.shared_b.to("meta"))


def config_object(raw: bytes) -> dict:
    """An adapter config file's JSON object, whatever its `peft_type`, read under its bound."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is {len(raw)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return data


def read_config_object(folder: Path) -> dict:
    """`config_object` of a folder's config file (a PEFT checkpoint's too)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder.name} has no {CONFIG_FILE}")
    return config_object(_read_limited(path, MAX_CONFIG_BYTES))


def parse_config(raw: bytes) -> AdapterConfig:
    data = config_object(raw)
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as e:
        raise AdapterError(f"invalid {CONFIG_FILE}: {problems(e)}") from None


def parse_weights(raw: bytes, config: AdapterConfig) -> PtMoeAdapter:
    """Check the safetensors header against the config, then decode, then check the values."""
    header, data_bytes = _read_header(raw)
    check_header(header, data_bytes, config)
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise AdapterError(f"{WEIGHTS_FILE} is corrupt: {e}") from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {key} holds NaN or Inf values")
    as_float = {key: tensor.to(torch.float32).contiguous() for key, tensor in tensors.items()}
    return PtMoeAdapter(
        config=config,
        experts_a=as_float["experts.A"],
        shared_b=as_float["shared.B"],
        router_weight=as_float["router.weight"],
        router_bias=as_float["router.bias"],
    )


def check_header(header: dict, data_bytes: int, config: AdapterConfig) -> None:
    """The weights file's header holds exactly the config's tensors, in a float dtype, at the
    config's shapes, within the `data_bytes` that follow it."""
    expected = config.tensor_shapes()
    found = set(header) - {"__metadata__"}
    if found != set(expected):
        missing = sorted(set(expected) - found)
        unexpected = sorted(found - set(expected))
        raise AdapterError(
            f"{WEIGHTS_FILE} must hold exactly {sorted(expected)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected}" if unexpected else "")
        )
    for key, shape in expected.items():
        info = header[key]
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {key} has dtype {dtype}; a floating point dtype is "
                               "required")
        found_shape = info.get("shape")
        if not isinstance(found_shape, list) or tuple(found_shape) != shape:
            raise AdapterError(f"tensor {key} has shape {found_shape!r}; the config asks for "
                               f"{list(shape)}")
    needed = max(_data_end(header[key]) for key in expected)
    if needed > data_bytes:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: its tensors need {needed} bytes of "
                           f"data and it holds {data_bytes}")


def _data_end(info: dict) -> int:
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise AdapterError(f"{WEIGHTS_FILE} has a corrupt header")
    return offsets[1]


def _read_header(raw: bytes) -> tuple[dict, int]:
    """The parsed JSON header and the number of data bytes after it."""
    if len(raw) < 8:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: {len(raw)} bytes")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > MAX_HEADER_BYTES or length > len(raw) - 8:
        raise AdapterError(
            f"{WEIGHTS_FILE} is corrupt or truncated: its header claims {length} bytes "
            f"and the file holds {len(raw) - 8} after the length"
        )
    try:
        header = json.loads(raw[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterError(f"{WEIGHTS_FILE} has a corrupt header") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} has a corrupt header")
    return header, len(raw) - 8 - length


def read_adapter(folder: Path,
                 check_config: Callable[[AdapterConfig], None] = lambda config: None) -> PtMoeAdapter:
    """Load and validate an adapter folder. Never opens a pickle-based file. `check_config`
    may refuse the config (raising AdapterError) before the weights are read."""
    return read_weights(folder, read_config(folder, check_config))


def read_config(folder: Path,
                check_config: Callable[[AdapterConfig], None] = lambda config: None) -> AdapterConfig:
    """An adapter folder's validated config, once its weights file is known to be there."""
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{folder.name} holds pickle-based weights {pickles}, which are never loaded; "
                f"save the adapter as {WEIGHTS_FILE}"
            )
        raise AdapterError(f"{folder.name} has no {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise AdapterError(f"{folder.name} has no {CONFIG_FILE}")
    config = parse_config(_read_limited(config_path, MAX_CONFIG_BYTES))
    check_config(config)
    return config


def read_weights(folder: Path, config: AdapterConfig) -> PtMoeAdapter:
    """The adapter whose config `read_config` gave, its weights checked against it."""
    return parse_weights(_read_limited(folder / WEIGHTS_FILE, MAX_WEIGHTS_BYTES), config)


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as file:
        data = file.read(limit + 1)  # never more, whatever the file grew to since a stat
    if len(data) > limit:
        raise AdapterError(f"{path.name} is over the limit of {limit} bytes")
    return data


def adapter_files(adapter: PtMoeAdapter) -> tuple[bytes, bytes]:
    """The contents of an adapter folder's two files: config, weights."""
    config = json.dumps(adapter.config.model_dump(), indent=2) + "\n"
    weights = save({k: v.contiguous() for k, v in adapter.tensors().items()},
                   metadata={"format": "pt"})
    return config.encode(), weights


def write_adapter(adapter: PtMoeAdapter, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config, weights = adapter_files(adapter)
    (folder / CONFIG_FILE).write_bytes(config)
    (folder / WEIGHTS_FILE).write_bytes(weights)
