"""A Llama-architecture model of a chosen hidden size with random weights and the default
model's tokenizer: for measuring what grows with H (adapter files, banks, the bulk start-up)
on a machine that has no large model. One layer, so it loads in seconds; it answers nonsense.

    python -m bench.synthetic_model --hidden 4096 --out /tmp/llama-h4096
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptmoe_serve.base_model import default_cache_dir, ensure_default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def write_synthetic_model(out: Path, hidden_size: int, seed: int = 0) -> Path:
    source = ensure_default_model(default_cache_dir())
    base = LlamaConfig.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=base.vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size,
        num_hidden_layers=1, num_attention_heads=hidden_size // 128, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=base.max_position_embeddings,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
        tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_synthetic_model(args.out, args.hidden))


if __name__ == "__main__":
    main()
