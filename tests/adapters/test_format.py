import json
import struct

import pytest
import torch
from safetensors.torch import save, save_file

from helpers import make_config, random_adapter
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import (CONFIG_FILE, WEIGHTS_FILE, parse_config, parse_weights,
                                         read_adapter, write_adapter)


def config_bytes(**overrides) -> bytes:
    data = make_config().model_dump()
    data.update(overrides)
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


def weights_bytes(**overrides) -> bytes:
    tensors = random_adapter().tensors()
    tensors.update(overrides)
    return save({k: v for k, v in tensors.items() if v is not None})


def test_round_trip(tmp_path):
    adapter = random_adapter(seed=3, num_experts=3, top_k=2, router_scaling="none")
    write_adapter(adapter, tmp_path / "a")
    loaded = read_adapter(tmp_path / "a")
    assert loaded.config == adapter.config
    for key, tensor in adapter.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor)


def test_half_precision_tensors_load_as_float32():
    tensors = {k: v.to(torch.bfloat16) for k, v in random_adapter().tensors().items()}
    adapter = parse_weights(save(tensors), make_config())
    assert adapter.experts_a.dtype == torch.float32


@pytest.mark.parametrize("overrides, message", [
    ({"peft_type": "LORA"}, "peft_type"),
    ({"format_version": 2}, "format_version"),
    ({"top_k": 3}, "top_k=3 must be between 1 and num_experts=2"),
    ({"top_k": 0}, "top_k"),
    ({"router_scaling": "softmax"}, "router_scaling"),
    ({"hidden_size": None}, "hidden_size: Field required"),
    ({"rank": "many"}, "rank"),
    ({"rank": 1_000_000}, "rank: Input should be less than or equal to 4096"),
    ({"num_experts": 10_000, "top_k": 1}, "num_experts: Input should be less than or equal"),
    ({"num_experts": 200, "prompt_length": 4096, "rank": 64},
     "would have 52433224 parameters; the limit is 33554432"),
])
def test_bad_configs_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(AdapterError, match=message):
        parse_config(config_bytes(**overrides))


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 65_000])
def test_malformed_config_json(raw):
    with pytest.raises(AdapterError, match=CONFIG_FILE):
        parse_config(raw)


@pytest.mark.parametrize("overrides, message", [
    ({"router.bias": None}, r"missing \['router.bias'\]"),
    ({"extra.C": torch.zeros(2)}, r"unexpected \['extra.C'\]"),
    ({"shared.B": torch.zeros(3, 17)}, r"shared.B has shape \[3, 17\]; the config asks for \[3, 16\]"),
    ({"router.weight": torch.zeros(2, 16, dtype=torch.int32)}, "dtype I32"),
    ({"experts.A": torch.full((2, 4, 3), float("nan"))}, "NaN or Inf"),
    ({"router.bias": torch.tensor([float("inf"), 0.0])}, "NaN or Inf"),
])
def test_bad_tensors_are_refused(overrides, message):
    with pytest.raises(AdapterError, match=message):
        parse_weights(weights_bytes(**overrides), make_config())


def header_bytes(**changes) -> bytes:
    """A weights file whose header has these fields changed on every tensor."""
    header = {k: {"dtype": "F32", "shape": list(s), "data_offsets": [0, 4]}
              for k, s in make_config().tensor_shapes().items()}
    for info in header.values():
        info.update(changes)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(4096)


@pytest.mark.parametrize("raw, message", [
    (header_bytes(shape=None), "has shape None"),
    (header_bytes(shape=7), "has shape 7"),
    (header_bytes(dtype=["F32"]), r"has dtype \['F32'\]"),
    (header_bytes(data_offsets=None), "corrupt header"),
    (struct.pack("<Q", 65_000) + b"[" * 65_000, "corrupt header"),
])
def test_hostile_headers_are_adapter_errors(tmp_path, raw, message):
    """Whatever the header holds, the answer is an AdapterError naming the problem (a 400 over
    the API, a skipped folder in the store)."""
    with pytest.raises(AdapterError, match=message):
        parse_weights(raw, make_config())


def test_truncated_weights_are_refused():
    raw = weights_bytes()
    for cut in (4, 40, len(raw) - 10):
        with pytest.raises(AdapterError, match="truncated|corrupt"):
            parse_weights(raw[:cut], make_config())


def test_absurd_header_size_is_refused_without_allocating():
    raw = struct.pack("<Q", 2**60) + b"{}"
    with pytest.raises(AdapterError, match="header claims 1152921504606846976 bytes"):
        parse_weights(raw, make_config())


def test_tensor_data_beyond_the_file_is_refused():
    header = json.dumps({k: {"dtype": "F32", "shape": list(s), "data_offsets": [0, 10**9]}
                         for k, s in make_config().tensor_shapes().items()}).encode()
    with pytest.raises(AdapterError, match="truncated: its tensors need 1000000000 bytes"):
        parse_weights(struct.pack("<Q", len(header)) + header, make_config())


def test_pickle_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / CONFIG_FILE).write_bytes(config_bytes())
    torch.save(random_adapter().tensors(), folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"pickle-based weights \['adapter_model.bin'\]"):
        read_adapter(folder)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nothing")
    folder = tmp_path / "a"
    folder.mkdir()
    save_file(random_adapter().tensors(), folder / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match=f"no {CONFIG_FILE}"):
        read_adapter(folder)
