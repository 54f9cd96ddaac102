"""Adapters built in code for the tests, and an independent reference of the routing math."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import torch
from safetensors.torch import load_file

from bench.server_process import RunningServer, reap_server, stop_server
from ptmoe_serve.adapters.config import AdapterConfig
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, PtMoeAdapter, write_adapter


def make_config(hidden_size=16, num_experts=2, prompt_length=4, rank=3, top_k=1,
                router_scaling="probability") -> AdapterConfig:
    return AdapterConfig(peft_type="PT_MOE", format_version=1, base_model_name_or_path="test",
                         hidden_size=hidden_size, num_experts=num_experts,
                         prompt_length=prompt_length, rank=rank, top_k=top_k,
                         router_scaling=router_scaling)


def random_adapter(seed: int = 0, **config) -> PtMoeAdapter:
    cfg = make_config(**config)
    g = torch.Generator().manual_seed(seed)
    n, t, r, h = cfg.num_experts, cfg.prompt_length, cfg.rank, cfg.hidden_size
    return PtMoeAdapter(cfg, torch.randn(n, t, r, generator=g), torch.randn(r, h, generator=g),
                        torch.randn(n, h, generator=g), torch.randn(n, generator=g))


def adapter_bytes(tmp_path: Path, seed: int = 0) -> tuple[bytes, bytes]:
    """A random adapter's two files' contents."""
    folder = tmp_path / f"src{seed}"
    write_adapter(random_adapter(seed=seed), folder)
    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()


def text_experts_adapter(table: torch.Tensor, text_ids: list[list[int]], seed: int,
                         **config) -> PtMoeAdapter:
    """Expert i reproduces (at rank R) the embeddings of text i; the router is random, so
    different prompts pick different experts. Soft prompts that read like text keep the model's
    answers confident, which makes greedy comparisons meaningful."""
    cfg = make_config(hidden_size=table.shape[1], num_experts=len(text_ids), **config)
    t = cfg.prompt_length
    rows = [table[torch.tensor([ids[i % len(ids)] for i in range(t)])] for ids in text_ids]
    u, s, vh = torch.linalg.svd(torch.cat(rows), full_matrices=False)
    root = s[: cfg.rank].sqrt()
    experts_a = (u[:, : cfg.rank] * root).reshape(cfg.num_experts, t, cfg.rank)
    g = torch.Generator().manual_seed(seed)
    # Mean prompt embeddings have a norm near 1 here: logits of order 1 spread the router.
    router_weight = torch.randn(cfg.num_experts, cfg.hidden_size, generator=g) * 1.5
    router_bias = torch.randn(cfg.num_experts, generator=g) * 0.1
    return PtMoeAdapter(cfg, experts_a.contiguous(), (root[:, None] * vh[: cfg.rank]).contiguous(),
                        router_weight, router_bias)


def reference_soft_prompt(adapter_dir: Path, token_embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's forward pass, straight from the files, one prompt at a time."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = load_file(adapter_dir / "adapter_model.safetensors")
    x = token_embeddings.double().mean(dim=0)
    p = torch.softmax(w["router.weight"].double() @ x + w["router.bias"].double(), dim=0)
    kept = torch.topk(p, config["top_k"]).indices
    mixed = torch.zeros_like(w["experts.A"][0], dtype=torch.float64)
    for i in kept.tolist():
        weight = p[i] if config["router_scaling"] == "probability" else 1.0
        mixed += weight * w["experts.A"][i].double()
    return (mixed @ w["shared.B"].double()).float()


# (adapter folder, prompt ids, new tokens) -> the reference's greedy tokens: computed once, for
# every server and route compared with it.
_GREEDY: dict[tuple, list[int]] = {}


@torch.inference_mode()
def reference_greedy(hf_model, adapter_dir: Path | None, ids: list[int], max_tokens: int,
                     route_tokens: int | None = None) -> list[int]:
    """transformers' greedy generation from [P; token embeddings], P from the adapter's files
    (the bare model when `adapter_dir` is None), routed on the first `route_tokens` ids (all
    when None)."""
    key = (adapter_dir, tuple(ids), max_tokens, route_tokens)
    if key not in _GREEDY:
        embeds = hf_model.get_input_embeddings()(torch.tensor(ids))
        if adapter_dir is not None:
            routed = embeds[: route_tokens or len(ids)]
            embeds = torch.cat([reference_soft_prompt(adapter_dir, routed), embeds])
        out = hf_model.generate(inputs_embeds=embeds[None],
                                attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                max_new_tokens=max_tokens, do_sample=False)
        _GREEDY[key] = out[0].tolist()
    return _GREEDY[key]


@torch.inference_mode()
def reference_prompt_logprobs(hf_model, adapter_dir: Path | None, ids: list[int],
                              route_tokens: int | None = None) -> list[float]:
    """log p(prompt token j | soft prompt, tokens before j), for every j the model scores:
    all of them under a soft prompt (routed on the first `route_tokens` ids, all when None),
    all but the first for the bare model (`adapter_dir` None)."""
    embeds = hf_model.get_input_embeddings()(torch.tensor(ids))
    soft = 0
    if adapter_dir is not None:
        prompt = reference_soft_prompt(adapter_dir, embeds[: route_tokens or len(ids)])
        embeds, soft = torch.cat([prompt, embeds]), len(prompt)
    logprobs = torch.log_softmax(hf_model(inputs_embeds=embeds[None]).logits[0].double(), -1)
    first = 0 if soft else 1
    return [logprobs[soft + j - 1, ids[j]].item() for j in range(first, len(ids))]


# Store folders as a hostile or careless user leaves them: name -> words of the reason each
# is skipped with.
HOSTILE = {"huge-rank": "rank", "null-shape": "has shape None", "deep-json": "not valid JSON",
           "not-a-config": "peft_type"}


def null_shape(weights: bytes) -> bytes:
    """A weights file whose header says `"shape": null` for every tensor."""
    import struct

    length = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + length])
    raw = json.dumps({k: v if k == "__metadata__" else {**v, "shape": None}
                      for k, v in header.items()}).encode()
    return struct.pack("<Q", len(raw)) + raw + weights[8 + length:]


def hostile_folders(store: Path, good: Path, prefix: str = "") -> None:
    """Write the HOSTILE folders into `store`, made from the good adapter folder `good`."""
    config = json.loads((good / CONFIG_FILE).read_text())
    weights = (good / WEIGHTS_FILE).read_bytes()
    for name, config_text, weights_bytes in [
        ("huge-rank", json.dumps({**config, "rank": 1_000_000}), weights),
        ("null-shape", json.dumps(config), null_shape(weights)),
        ("deep-json", "[" * 65_000, weights),
        ("not-a-config", '{"peft_type": 7}', weights),
    ]:
        folder = store / f"{prefix}{name}"
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(config_text)
        (folder / WEIGHTS_FILE).write_bytes(weights_bytes)


# Servers told to stop whose ends the tests do not wait for (reaped when the session ends).
_STOPPING: list[RunningServer] = []


def stop_later(server: RunningServer) -> None:
    """A fixture's teardown: the server is told to stop, and the next tests go on while it
    does (a stop takes seconds, more beside another worker's load)."""
    stop_server(server, wait=False)
    _STOPPING.append(server)


def reap_stopped() -> None:
    while _STOPPING:
        reap_server(_STOPPING.pop())


def mount_tmpfs(folder: Path, size: str) -> None:
    """A size-limited tmpfs at `folder` (a store that fills up for real); the test is skipped,
    saying why, where this machine cannot mount one (mounting needs root)."""
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs for the store here (needs root): {e}")


def fill_volume(folder: Path, leave: int = 0) -> Path:
    """A file in `folder` that takes its volume's free space but `leave` bytes: written until
    the volume refuses (to its last page), then cut by `leave`, so that whatever other
    processes write meanwhile, it fits. The caller removes it."""
    filler = folder / ".filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


_HOLD_LOCK = """
import fcntl, signal, sys
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
print("held", flush=True)
signal.pause()
"""


@contextmanager
def lock_held_by_another_process(path: Path) -> Iterator[subprocess.Popen]:
    """`path` locked (flock, as the store locks) by a process of its own for the whole block;
    it is killed at the end, and a dead holder lets go."""
    peer = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "held"
        yield peer
    finally:
        peer.kill()
        peer.wait()
