"""Adapters coming and going on a running server with keys: management API, every refusal,
watching the store, replace and unload under traffic, a bounded soak, restarts and drains."""

import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save

from bench.server_process import start_server, stop_server
from conftest import BASE, TEXTS
from helpers import HOSTILE, hostile_folders, null_shape, stop_later, text_experts_adapter
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, write_adapter
from ptmoe_serve.base_model import load_input_embeddings

USER, ADMIN = "user-key", "admin-key"
PROMPT = "Once upon a time, there was a little"
UPLOAD_LIMIT_MB = 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory, model_dir, tokenizer):
    """Folders and adapters: a store, a second allowed root, and a root that is not allowed."""
    root = tmp_path_factory.mktemp("lifecycle")
    store, library, outside = root / "store", root / "library", root / "outside"
    for folder in (store, library, outside):
        folder.mkdir()
    table = load_input_embeddings(model_dir)
    texts = [tokenizer.encode(t) for t in TEXTS]
    adapters = {f"v{i}": text_experts_adapter(table, [texts[i % 3], texts[(i + 1) % 3]], seed=i,
                                              prompt_length=10, rank=8)
                for i in range(4)}
    # A shape no other adapter of the lab has: its bank comes and goes with it.
    adapters["odd-shape"] = text_experts_adapter(table, texts[:2], seed=9, prompt_length=6,
                                                 rank=3)
    for name, adapter in adapters.items():
        write_adapter(adapter, library / name)
    write_adapter(adapters["v0"], store / "stable")
    hostile_folders(store, library / "v0")  # the server must start all the same
    write_adapter(adapters["v1"], outside / "evil")
    (library / "escape").symlink_to(outside / "evil")
    return {"root": root, "store": store, "library": library, "outside": outside,
            "adapters": adapters}


def server_args(lab, model_dir) -> list[str]:
    # The admin key from a file, as operators keep it out of the process list.
    admin_key_file = lab["root"] / "admin.key"
    admin_key_file.write_text(ADMIN + "\n")
    return ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
            "--adapters", str(lab["store"]), "--allow-adapter-path", str(lab["library"]),
            "--api-key", USER, "--admin-api-key-file", str(admin_key_file),
            "--watch-interval", "0.5",
            "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--shutdown-timeout", "60",
            # Cached prefixes must never answer for a replaced adapter (tested below).
            "--enable-prefix-caching",
            # Starts in seconds instead of compiling (minutes on two cores; it starts twice);
            # the compiled default is what the shared `server` fixture runs.
            "--enforce-eager",
            # Fine-tuning is tested on a server of its own (api/test_fine_tuning.py).
            "--no-fine-tune-worker"]


@pytest.fixture(scope="module")
def server(lab, model_dir):
    running = start_server(server_args(lab, model_dir), lab["root"] / "server.log")
    yield running
    stop_later(running)


def client(server, key=USER) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120,
                        headers={"authorization": f"Bearer {key}"} if key else {})


def greedy(server, model: str, max_tokens: int = 12) -> str:
    response = client(server).post("/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def adapter_files(folder: Path) -> dict:
    return {name: (name, (folder / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}


def upload(server, name: str, files: dict, key=ADMIN) -> httpx.Response:
    return client(server, key).put(f"/v1/adapters/{name}", files=files)


def names(server) -> list[str]:
    return [a["name"] for a in client(server, ADMIN).get("/v1/adapters").json()["data"]]


def wait_until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_keys(server, lab):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    for key, models, admin in [(None, 401, 401), ("wrong", 401, 401), (USER, 200, 401),
                               (ADMIN, 200, 200)]:
        c = client(server, key)
        assert c.get("/v1/models").status_code == models
        assert c.get("/v1/adapters").status_code == admin
    refused = client(server, None).post("/v1/completions", json={"model": "stable",
                                                                  "prompt": "x"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    # Adapter folders are shown to whoever may manage adapters, not to every caller (on
    # the cards of resident adapters: its first request makes "stable" one).
    assert client(server, USER).post("/v1/completions", json={
        "model": "stable", "prompt": "x", "max_tokens": 1}).status_code == 200
    for key, shows_path in [(USER, False), (ADMIN, True)]:
        cards = {m["id"]: m for m in client(server, key).get("/v1/models").json()["data"]}
        assert cards["stable"]["root"] == (str(lab["store"] / "stable") if shows_path
                                           else "stable"), cards["stable"]
    # The key comes before the body: a 40 MB body of nested lists (about 1 GB once parsed)
    # is refused unread without a key, and over the size limit with one.
    api_process = psutil.Process(server.process.pid)
    before = api_process.memory_info().rss
    big = b'{"model": "stable", "prompt": [' + b"[1]," * 10_000_000 + b"[1]]}"
    for key, expected in [(None, 401), (USER, 413)]:
        refused = client(server, key).post("/v1/completions", content=big,
                                           headers={"content-type": "application/json"})
        assert refused.status_code == expected, refused.text
    assert api_process.memory_info().rss - before < 150 * 1024 * 1024
    # A page on another site, its name rebound to 127.0.0.1, cannot reach the server (DNS
    # rebinding); nor can a proxy in front that was not named with --allowed-host.
    for path, key in [("/v1/adapters", ADMIN), ("/v1/models", USER), ("/health", None)]:
        rebound = client(server, key).get(path, headers={"host": "rebind.example:80"})
        assert rebound.status_code == 400, rebound.text
        assert "--allowed-host rebind.example" in rebound.json()["error"]["message"]
    # FastAPI's /docs and schema are off unless asked for (--no-disable-fastapi-docs).
    assert client(server, USER).get("/docs").status_code == 404
    assert client(server, USER).get("/openapi.json").status_code == 404
    assert greedy(server, "stable")


def test_load_from_an_allowed_root_then_replace(server, lab):
    admin = client(server, ADMIN)
    response = admin.post("/v1/adapters", json={"name": "loaded",
                                                "path": str(lab["library"] / "v1")})
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["version"] >= 1 and info["num_experts"] == 2 and info["load_ms"] < 100
    assert greedy(server, "loaded")
    taken = admin.post("/v1/adapters", json={"name": "loaded", "path": str(lab["library"] / "v2")})
    assert taken.status_code == 409
    replaced = admin.post("/v1/adapters", json={"name": "loaded", "replace": True,
                                                "path": str(lab["library"] / "v2")})
    assert replaced.json()["version"] > info["version"]
    assert admin.get("/v1/adapters/loaded").json()["source"] == str(lab["library"] / "v2")


def test_bad_loads_are_refused_and_change_nothing(server, lab):
    before = greedy(server, "stable")
    listed = names(server)
    admin = client(server, ADMIN)
    cases = [
        ({"name": "evil", "path": str(lab["outside"] / "evil")}, 403, "outside the allowed roots"),
        ({"name": "evil", "path": str(lab["library"] / "escape")}, 403, "outside"),
        ({"name": "evil", "path": str(lab["library"] / ".." / "outside" / "evil")}, 403, "outside"),
        ({"name": "x", "path": str(lab["library"] / "missing")}, 400, "does not exist"),
        # Outside the roots, existing or not: the same 403 (no probing the host's files).
        ({"name": "x", "path": "/etc/ssh"}, 403, "outside the allowed roots"),
        ({"name": "x", "path": "/no/such/folder"}, 403, "outside the allowed roots"),
        ({"name": "x", "path": "library/v1"}, 400, "must be absolute"),
        ({"name": "a/b", "path": str(lab["library"] / "v1")}, 400, "invalid adapter name"),
        ({"name": "..", "path": str(lab["library"] / "v1")}, 400, "invalid adapter name"),
        ({"name": "", "path": str(lab["library"] / "v1")}, 400, "invalid adapter name"),
        ({"name": "n" * 200, "path": str(lab["library"] / "v1")}, 400, "invalid adapter name"),
        ({"name": BASE, "path": str(lab["library"] / "v1")}, 409, "base model"),
        # vLLM matches chat content-part types against model names: reserved.
        ({"name": "image", "path": str(lab["library"] / "v1")}, 409, "content-part type"),
        ({"name": "x"}, 400, "Field required"),
        ({"name": "x", "path": str(lab["library"] / "v1"), "bogus": 1}, 400, "bogus"),
    ]
    for body, status, words in cases:
        response = admin.post("/v1/adapters", json=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"], response.text
    assert names(server) == listed
    assert greedy(server, "stable") == before


def corrupt_uploads(lab) -> list[tuple[str, dict, int, str]]:
    good = adapter_files(lab["library"] / "v3")
    config = json.loads(good[CONFIG_FILE][1])
    tensors = lab["adapters"]["v3"].tensors()

    def with_config(**changes):
        return {**good, CONFIG_FILE: (CONFIG_FILE, json.dumps({**config, **changes}).encode())}

    def with_tensors(**changes):
        new = {**tensors, **{k.replace("_", "."): v for k, v in changes.items()}}
        return {**good, WEIGHTS_FILE: (WEIGHTS_FILE, save({k: v for k, v in new.items()
                                                           if v is not None}))}

    weights = good[WEIGHTS_FILE][1]
    return [
        ("c1", {**good, CONFIG_FILE: (CONFIG_FILE, b"{oops")}, 400, "not valid JSON"),
        ("c2", with_config(peft_type="LORA"), 400, "peft_type"),
        ("c3", with_config(format_version=9), 400, "format_version"),
        ("c4", with_config(hidden_size=4096), 400, "hidden_size"),
        ("c5", with_config(top_k=5), 400, "top_k"),
        ("c6", with_config(router_scaling="sigmoid"), 400, "router_scaling"),
        ("c7", with_config(prompt_length=600), 400, "leaves no room in the context"),
        ("c8", with_config(prompt_length=200), 400, "--max-soft-prompt-length"),
        ("t1", with_tensors(router_bias=None), 400, "missing"),
        ("t2", with_tensors(extra_C=torch.zeros(1)), 400, "unexpected"),
        ("t3", with_tensors(shared_B=torch.zeros(8, 575)), 400, "shape"),
        ("t4", with_tensors(router_weight=torch.zeros(2, 576, dtype=torch.int64)), 400, "dtype"),
        ("t5", with_tensors(experts_A=torch.full((2, 10, 8), float("nan"))), 400, "NaN"),
        ("t6", {**good, WEIGHTS_FILE: (WEIGHTS_FILE, weights[: len(weights) // 2])}, 400,
         "truncated"),
        ("t7", {**good, WEIGHTS_FILE: (WEIGHTS_FILE, struct.pack("<Q", 2**62) + b"{}")}, 400,
         "header claims"),
        ("t8", {**good, WEIGHTS_FILE: (WEIGHTS_FILE, b"\x80\x04pickle")}, 400, "corrupt"),
        ("t9", {**good, WEIGHTS_FILE: (WEIGHTS_FILE, null_shape(weights))}, 400,
         "has shape None"),
        ("c9", with_config(rank=1_000_000), 400, "less than or equal to 4096"),
        ("c10", {**good, CONFIG_FILE: (CONFIG_FILE, b"[" * 60_000)}, 400, "not valid JSON"),
        # Refused before anything is written: no folder of that name is left in the store.
        (BASE, good, 409, "base model"),
        ("f1", {CONFIG_FILE: good[CONFIG_FILE]}, 400, f"{WEIGHTS_FILE} is missing"),
        ("big", {**good, WEIGHTS_FILE: (WEIGHTS_FILE, b"0" * (UPLOAD_LIMIT_MB * 2**20 + 1))},
         413, "limit"),
        ("a..b", good, 400, "invalid adapter name"),
        # "demo\n" once passed a "^...$" pattern and became a name ending in a newline.
        ("demo%0A", good, 400, "invalid adapter name"),
    ]


@pytest.fixture(scope="module")
def peft_checkpoints(lab, model_dir):
    """A PEFT prompt-tuning checkpoint and a PEFT LoRA adapter, saved by `peft`, in the
    allowed library."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.adapters import write_lora_adapters

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = get_peft_model(base, PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="Answer like a pirate", tokenizer_name_or_path=str(model_dir)))
    tuned.save_pretrained(lab["library"] / "peft-prompt")
    lora = write_lora_adapters(lab["library"] / "peft-lora", model_dir, 1, 4, ["q_proj"])[0]
    # A checkpoint whose weights never arrived.
    (lab["library"] / "peft-no-weights").mkdir()
    shutil.copy(lab["library"] / "peft-prompt" / CONFIG_FILE, lab["library"] / "peft-no-weights")
    return {"prompt_tuning": lab["library"] / "peft-prompt", "lora": lora,
            "no_weights": lab["library"] / "peft-no-weights"}


def vllm_lora_call(server, path: str, body: dict, key=ADMIN) -> httpx.Response:
    """vLLM's runtime LoRA endpoints, called as AIBrix's ModelAdapter controller calls them:
    a JSON body, and the key from the ModelAdapter's `api-key` as a bearer token."""
    return client(server, key).post(path, json=body)


def test_vllms_lora_endpoints_load_and_unload_as_aibrix_calls_them(server, lab):
    body = {"lora_name": "aibrix-a", "lora_path": str(lab["library"] / "v2")}
    loaded = vllm_lora_call(server, "/v1/load_lora_adapter", body)
    assert (loaded.status_code, loaded.text) == (
        200, "Success: LoRA adapter 'aibrix-a' added successfully.")
    models = {m["id"]: m for m in client(server).get("/v1/models").json()["data"]}
    assert models["aibrix-a"]["adapter"]["pinned"] is True
    answer = greedy(server, "aibrix-a")
    # Another replica over the same store, or the controller again: made resident, pinned.
    again = vllm_lora_call(server, "/v1/load_lora_adapter", body)
    assert again.status_code == 200, again.text
    # Another adapter under the name: vLLM's 400, unless in place.
    other = {**body, "lora_path": str(lab["library"] / "v3")}
    taken = vllm_lora_call(server, "/v1/load_lora_adapter", other)
    assert taken.status_code == 400
    assert taken.json()["error"] == {
        "message": "The lora adapter 'aibrix-a' has already been loaded. If you want to load "
                   "the adapter in place, set 'load_inplace' to True.",
        "type": "InvalidUserInput", "param": None, "code": 400}
    assert greedy(server, "aibrix-a") == answer
    in_place = vllm_lora_call(server, "/v1/load_lora_adapter", {**other, "load_inplace": True})
    assert in_place.status_code == 200, in_place.text
    assert greedy(server, "aibrix-a") != answer

    unloaded = vllm_lora_call(server, "/v1/unload_lora_adapter", {"lora_name": "aibrix-a"})
    assert (unloaded.status_code, unloaded.text) == (
        200, "Success: LoRA adapter 'aibrix-a' removed successfully.")
    gone = client(server).post("/v1/completions", json={"model": "aibrix-a", "prompt": PROMPT,
                                                         "max_tokens": 2})
    assert gone.status_code == 404
    assert "aibrix-a" not in names(server)
    missing = vllm_lora_call(server, "/v1/unload_lora_adapter", {"lora_name": "aibrix-a"})
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "The lora adapter 'aibrix-a' cannot be found.", "type": "NotFoundError",
        "param": None, "code": 404}


def test_a_peft_prompt_tuning_checkpoint_loads_through_vllms_endpoint(server, peft_checkpoints):
    body = {"lora_name": "aibrix-peft", "lora_path": str(peft_checkpoints["prompt_tuning"])}
    for _ in range(2):  # the second finds it stored with the same content
        loaded = vllm_lora_call(server, "/v1/load_lora_adapter", body)
        assert loaded.status_code == 200, loaded.text
    assert greedy(server, "aibrix-peft")
    assert vllm_lora_call(server, "/v1/unload_lora_adapter",
                          {"lora_name": "aibrix-peft"}).status_code == 200


def test_vllms_lora_endpoints_refuse_bad_calls_and_change_nothing(server, lab,
                                                                  peft_checkpoints):
    before = greedy(server, "stable")
    listed = names(server)
    good = str(lab["library"] / "v1")
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    cases = [
        (load, {"lora_name": "x", "lora_path": good}, USER, 401, "admin key"),
        (load, {"lora_name": "x", "lora_path": good}, None, 401, "API key"),
        (unload, {"lora_name": "stable"}, USER, 401, "admin key"),
        (load, {"lora_name": "x", "lora_path": str(peft_checkpoints["lora"])}, ADMIN, 400,
         "holds a PEFT LORA adapter; this server serves PT-MoE adapters and PEFT prompt "
         "tuning"),
        (load, {"lora_name": "x", "lora_path": str(peft_checkpoints["no_weights"])}, ADMIN,
         400, "has no adapter_model.safetensors"),
        (load, {"lora_name": "x", "lora_path": str(lab["outside"] / "evil")}, ADMIN, 403,
         "outside the allowed roots"),
        (load, {"lora_name": "x", "lora_path": str(lab["library"] / "missing")}, ADMIN, 404,
         "No adapter found"),
        (load, {"lora_name": "x", "lora_path": "org/adapter"}, ADMIN, 400, "must be absolute"),
        (load, {"lora_name": "", "lora_path": good}, ADMIN, 400, "Both 'lora_name' and"),
        (load, {"lora_name": BASE, "lora_path": good}, ADMIN, 400, "conflicts with a served"),
        (load, {"lora_name": "a/b", "lora_path": good}, ADMIN, 400, "invalid adapter name"),
        (load, {"lora_name": "x", "lora_path": str(lab["store"] / "huge-rank")}, ADMIN, 400,
         "cannot be loaded"),
        (load, {"lora_name": "x"}, ADMIN, 400, "lora_path"),
        (unload, {"lora_name": ""}, ADMIN, 400, "'lora_name' needs to be provided"),
        (unload, {"lora_name": "never-loaded"}, ADMIN, 404, "cannot be found"),
    ]
    for path, body, key, status, words in cases:
        response = vllm_lora_call(server, path, body, key)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"], response.text
    oversized = client(server, ADMIN).post(load, content=b'{"lora_name": "' + b"x" * 100_000
                                           + b'"}', headers={"content-type": "application/json"})
    assert oversized.status_code == 413
    assert names(server) == listed
    assert greedy(server, "stable") == before


def test_bad_uploads_are_refused_and_change_nothing(server, lab):
    before = greedy(server, "stable")
    listed = names(server)
    stored = sorted(p.name for p in lab["store"].iterdir())
    for name, files, status, words in corrupt_uploads(lab):
        response = upload(server, name, files)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    # a bad version of an existing adapter leaves the good one in place
    assert upload(server, "stable", corrupt_uploads(lab)[1][1]).status_code == 400
    assert names(server) == listed
    assert sorted(p.name for p in lab["store"].iterdir()) == stored
    assert greedy(server, "stable") == before


def test_upload_is_stored_served_and_replaced(server, lab):
    response = upload(server, "uploaded", adapter_files(lab["library"] / "v1"))
    assert response.status_code == 200, response.text
    assert (lab["store"] / "uploaded" / WEIGHTS_FILE).exists()
    first = greedy(server, "uploaded")
    assert upload(server, "uploaded", adapter_files(lab["library"] / "v2"),
                  key=USER).status_code == 401
    assert upload(server, "uploaded", adapter_files(lab["library"] / "v2")).status_code == 200
    assert greedy(server, "uploaded") != first


def test_unload_and_purge(server, lab):
    admin = client(server, ADMIN)
    assert admin.delete("/v1/adapters/never-loaded").status_code == 404
    upload(server, "temp", adapter_files(lab["library"] / "v1"))
    upload(server, "gone", adapter_files(lab["library"] / "v2"))
    assert admin.delete("/v1/adapters/temp").status_code == 200
    assert admin.delete("/v1/adapters/gone", params={"purge": "true"}).status_code == 200
    time.sleep(1.5)  # the watcher must not bring either back
    assert "temp" not in names(server) and "gone" not in names(server)
    assert (lab["store"] / "temp").exists() and not (lab["store"] / "gone").exists()
    missing = client(server).post("/v1/completions", json={"model": "temp", "prompt": "x"})
    assert missing.status_code == 404


def test_hostile_store_folders_fail_their_first_request_and_are_listed(server, lab):
    """Planted before the start (the server started all the same) and copied in while it
    runs: each one's first request is a 400 naming what is wrong with it, it is listed with
    its reason in GET /v1/adapters, the adapters beside it answer as before, and the watcher
    goes on to serve a good folder copied in after them."""
    admin = client(server, ADMIN)
    stable = greedy(server, "stable")

    def refused(name: str, reason: str) -> None:
        response = client(server).post("/v1/completions", json={
            "model": name, "prompt": PROMPT, "max_tokens": 2})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert reason in error["message"] and error["param"] == "model", error

    for name, reason in HOSTILE.items():
        refused(name, reason)
    failed = {f["name"]: f["error"] for f in admin.get("/v1/adapters").json()["failed"]}
    for name, reason in HOSTILE.items():
        assert reason in failed.get(name, ""), (name, failed)
    hostile_folders(lab["store"], lab["library"] / "v2", prefix="late-")
    shutil.copytree(lab["library"] / "v3", lab["store"] / "after-the-hostile")
    assert wait_until(lambda: "after-the-hostile" in names(server))
    for name, reason in HOSTILE.items():
        refused(f"late-{name}", reason)
    failed = {f["name"] for f in admin.get("/v1/adapters").json()["failed"]}
    assert {f"late-{name}" for name in HOSTILE} <= failed
    assert greedy(server, "after-the-hostile")
    assert greedy(server, "stable") == stable
    assert admin.delete("/v1/adapters/after-the-hostile", params={"purge": "true"}
                        ).status_code == 200
    for name in HOSTILE:
        shutil.rmtree(lab["store"] / f"late-{name}")


def test_store_folder_copied_in_or_removed_is_followed(server, lab):
    shutil.copytree(lab["library"] / "v3", lab["store"] / "dropped-in")
    assert wait_until(lambda: "dropped-in" in names(server), 10)
    assert greedy(server, "dropped-in")
    shutil.rmtree(lab["store"] / "dropped-in")
    assert wait_until(lambda: "dropped-in" not in names(server), 10)


def stream_text(server, model: str, max_tokens: int, started: threading.Event | None = None):
    """Stream a greedy completion; set `started` once the first token has arrived."""
    text, finish = [], None
    with client(server).stream("POST", "/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
            if started is not None:
                started.set()
    return "".join(text), finish


def adapter_series(server, adapter: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("adapter") == adapter]


def bank_bytes(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return next(sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "ptmoe_adapter_bank_bytes")


def test_an_unloaded_adapter_leaves_no_series_and_no_bank(server, lab):
    """Unloaded while one of its requests still streams: once that request ends, neither its
    metric series nor its bank (a shape of its own) is left behind."""
    admin = client(server, ADMIN)
    before = bank_bytes(server)
    assert admin.post("/v1/adapters", json={"name": "odd", "path": str(lab["library"] /
                                                                       "odd-shape")}
                      ).status_code == 200
    assert bank_bytes(server) > before
    assert greedy(server, "odd")
    assert adapter_series(server, "odd")
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_text, server, "odd", 64, started)
        assert started.wait(60)
        assert admin.delete("/v1/adapters/odd").status_code == 200
        assert streaming.result()[1] == "length"  # the request in flight ends as it began
    assert adapter_series(server, "odd") == []
    assert bank_bytes(server) == before


def test_replace_and_unload_under_traffic(server, lab):
    admin = client(server, ADMIN)
    expected = {}
    for version in ("v1", "v2"):
        admin.post("/v1/adapters", json={"name": version, "path": str(lab["library"] / version)})
        expected[version] = stream_text(server, version, 40)[0]
    assert expected["v1"] != expected["v2"]

    admin.post("/v1/adapters", json={"name": "swap", "path": str(lab["library"] / "v1"),
                                     "replace": True})
    with ThreadPoolExecutor(2) as pool:
        started = threading.Event()
        running = pool.submit(stream_text, server, "swap", 40, started)
        assert started.wait(60)
        replaced = admin.post("/v1/adapters", json={"name": "swap", "replace": True,
                                                    "path": str(lab["library"] / "v2")})
        assert replaced.status_code == 200
        assert running.result() == (expected["v1"], "length")  # the old version to the end
    # New requests get the new version, though the same prompt's blocks are in the cache.
    assert stream_text(server, "swap", 40)[0] == expected["v2"]

    with ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        running = pool.submit(stream_text, server, "swap", 40, started)
        assert started.wait(60)
        assert admin.delete("/v1/adapters/swap").status_code == 200
        assert running.result() == (expected["v2"], "length")
    assert client(server).post("/v1/completions", json={
        "model": "swap", "prompt": "x"}).status_code == 404


def test_soak_traffic_while_adapters_churn(server, lab):
    """Bounded: streaming requests over many adapters while others load, replace and unload."""
    admin = client(server, ADMIN)
    served = [f"soak{i}" for i in range(12)]
    for i, name in enumerate(served):
        assert admin.post("/v1/adapters", json={"name": name, "replace": True,
                                                "path": str(lab["library"] / f"v{i % 4}")
                                                }).status_code == 200
    process = psutil.Process(server.process.pid)
    results, churn_ops = [], [0]
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            name = f"churn{i % 5}"
            admin_c = client(server, ADMIN)
            admin_c.post("/v1/adapters", json={"name": name, "replace": True,
                                               "path": str(lab["library"] / f"v{i % 4}")})
            upload(server, name, adapter_files(lab["library"] / f"v{(i + 1) % 4}"))
            if i % 2:
                admin_c.delete(f"/v1/adapters/{name}", params={"purge": "true"})
            churn_ops[0] += 3 if not i % 2 else 4
            i += 1

    def traffic(worker: int):
        for j in range(16):
            name = served[(worker * 16 + j) % len(served)]
            try:
                text, finish = stream_text(server, name, 8)
                results.append("ok" if finish == "length" and text else f"bad finish {finish}")
            except Exception as e:  # noqa: BLE001 - any failure is counted, not raised here
                results.append(repr(e))

    for warm in range(2):
        stream_text(server, served[warm], 8)
    rss_before = process.memory_info().rss
    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(traffic, range(8)))
    finally:
        stop.set()
        churner.join()
    rss_growth = (process.memory_info().rss - rss_before) / 2**20
    print(f"soak: {len(results)} requests over {len(served)} adapters, {churn_ops[0]} churn "
          f"operations, {sum(r != 'ok' for r in results)} errors, RSS growth {rss_growth:.1f} MiB")
    assert results.count("ok") == 128, [r for r in results if r != "ok"][:5]
    assert churn_ops[0] > 0
    assert rss_growth < 200


@pytest.mark.ends_server
def test_restart_after_sigkill_mid_upload_serves_everything_as_before(server, lab, model_dir):
    admin = client(server, ADMIN)
    upload(server, "persisted", adapter_files(lab["library"] / "v3"))
    admin.post("/v1/adapters", json={"name": "linked", "replace": True,
                                     "path": str(lab["library"] / "v0")})
    expected = {name: greedy(server, name) for name in ("persisted", "linked", "stable")}
    before = set(names(server))

    # An upload whose body is still arriving when the server is killed.
    port = int(server.url.rsplit(":", 1)[1])
    body = b"--b\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; " \
           b"filename=\"adapter_model.safetensors\"\r\n\r\n" + b"\0" * 50_000
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"PUT /v1/adapters/half HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + ADMIN.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 900000\r\n\r\n" + body)
        time.sleep(0.5)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    # And what a kill in the middle of writing leaves behind.
    staged = lab["store"] / ".staging-torn-0badf00d"
    staged.mkdir()
    (staged / CONFIG_FILE).write_text("{")

    restarted = start_server(server_args(lab, model_dir), lab["root"] / "restart.log")
    try:
        assert set(names(restarted)) == before
        assert "half" not in names(restarted) and "torn" not in names(restarted)
        assert not staged.exists() and not (lab["store"] / "half").exists()
        for name, text in expected.items():
            assert greedy(restarted, name) == text
        drain_on_sigterm(restarted)
    finally:
        stop_server(restarted)


def drain_on_sigterm(server):
    """SIGTERM to the server's process (as `kill`, `docker stop` and Kubernetes send it) lets a
    running request finish, then the server exits cleanly."""
    with ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        running = pool.submit(stream_text, server, "stable", 60, started)
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        text, finish = running.result()
    assert finish == "length" and text
    # uvicorn re-raises the signal once it has shut down cleanly
    assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
