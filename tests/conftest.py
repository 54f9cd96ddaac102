from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. The switch is read when triton
# is first imported, which other libraries may do before any kernel test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.server_process import start_server, stop_server
from ptmoe_serve.base_model import default_cache_dir, ensure_default_model


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model(default_cache_dir())


# -- the real server, shared by the end-to-end tests ----------------------------------------

REPO_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
# The adapters the repository ships: the trained task adapters and the text-initialised example.
SHIPPED = sorted(p.name for p in REPO_ADAPTERS.iterdir() if (p / "adapter_config.json").exists())
BASE = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
API_ROUTE_QUEUE_LIMIT = 4
TEXTS = ["Answer in French, s'il vous plait.", "Talk like a pirate, arr matey!",
         "Reply with a short rhyming poem."]
# name -> shape and routing; together they cover top-1 and dense, both scalings.
E2E_ADAPTERS = {
    "top1": dict(num_texts=2, prompt_length=12, rank=8, top_k=1, router_scaling="probability"),
    "dense": dict(num_texts=3, prompt_length=8, rank=6, top_k=3, router_scaling="none"),
    "dense-prob": dict(num_texts=2, prompt_length=20, rank=12, top_k=2,
                       router_scaling="probability"),
}


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, model_dir, tokenizer) -> Path:
    import shutil

    from helpers import text_experts_adapter
    from ptmoe_serve.adapters.format import write_adapter
    from ptmoe_serve.base_model import load_input_embeddings

    folder = tmp_path_factory.mktemp("adapters")
    table = load_input_embeddings(model_dir)
    for seed, (name, spec) in enumerate(E2E_ADAPTERS.items()):
        spec = dict(spec)
        texts = [tokenizer.encode(t) for t in TEXTS[: spec.pop("num_texts")]]
        write_adapter(text_experts_adapter(table, texts, seed, **spec), folder / name)
    for name in SHIPPED:
        shutil.copytree(REPO_ADAPTERS / name, folder / name)
    return folder


def _server(model_dir, adapters_dir, tmp_path_factory, routing_location: str,
            *vllm_args: str):
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(["--model", str(model_dir), "--dtype", "float32",
                            "--adapters", str(adapters_dir), "--max-model-len", str(MAX_MODEL_LEN),
                            "--routing-location", routing_location, *vllm_args], log)
    assert routing_location_of(running) == routing_location
    return running


def admin_headers() -> dict[str, str]:
    """Management's credentials on the shared servers: the admin key generated at their first
    start, as a user without --admin-api-key finds it (the server's log names the file)."""
    key = (default_cache_dir() / "admin.key").read_text().strip()
    return {"authorization": f"Bearer {key}"}


def routing_location_of(server) -> str:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    info = next(f for f in families if f.name == "ptmoe_server_info")
    return info.samples[0].labels["routing"]


@pytest.fixture(scope="session")
def server(model_dir, adapters_dir, tmp_path_factory):
    """The server as users start it: on this model, the routing step runs in the engine, and
    vLLM compiles the model (its default, on the CPU too). With vLLM's own serving flags for
    tool calls and compact JSON."""
    running = _server(model_dir, adapters_dir, tmp_path_factory, "engine",
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                      "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def api_route_server(model_dir, adapters_dir, tmp_path_factory):
    """The other route: soft prompts computed in the API process, handed over as embeddings.
    With vLLM's admission limit at four engine requests (one per prompt): its tests send one
    request at a time, of up to four prompts."""
    running = _server(model_dir, adapters_dir, tmp_path_factory, "api",
                      "--max-num-queued-reqs", str(API_ROUTE_QUEUE_LIMIT))
    yield running
    stop_server(running)
