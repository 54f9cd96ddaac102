"""Two servers over one adapter store, as replicas behind a load balancer run: every change made
through one reaches the other at its next look at the store, and both name the same version of
an adapter in what they answer."""

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.server_process import start_server
from conftest import TEXTS
from helpers import stop_later, text_experts_adapter
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, write_adapter
from ptmoe_serve.base_model import load_input_embeddings

ADMIN = "replica-admin-key"
PROMPT = "Once upon a time, there was a little"
WATCH_INTERVAL = 0.5
CONVERGED = []  # seconds each change took to reach the second server


@pytest.fixture(scope="module")
def lab(tmp_path_factory, model_dir, tokenizer):
    root = tmp_path_factory.mktemp("replicas")
    (root / "store").mkdir()
    table = load_input_embeddings(model_dir)
    texts = [tokenizer.encode(t) for t in TEXTS]
    for i in range(3):
        write_adapter(text_experts_adapter(table, [texts[i], texts[(i + 1) % 3]], seed=i,
                                           prompt_length=10, rank=8), root / "library" / f"v{i}")
    (root / "admin.key").write_text(ADMIN)
    return root


@pytest.fixture(scope="module")
def replicas(lab, model_dir):
    args = ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
            "--adapters", str(lab / "store"), "--admin-api-key-file", str(lab / "admin.key"),
            "--watch-interval", str(WATCH_INTERVAL), "--enforce-eager", "--no-fine-tune-worker"]
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda i: start_server(args, lab / f"server{i}.log"), (0, 1)))
    yield started
    for server in started:
        stop_later(server)
    if CONVERGED:
        print(f"\nconverged in p50 {statistics.median(CONVERGED):.2f} s, "
              f"max {max(CONVERGED):.2f} s over {len(CONVERGED)} changes "
              f"(--watch-interval {WATCH_INTERVAL})")


def admin(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120,
                        headers={"authorization": f"Bearer {ADMIN}"})


def upload(server, name: str, folder) -> httpx.Response:
    files = {f: (f, (folder / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return admin(server).put(f"/v1/adapters/{name}", files=files)


def complete(server, model: str, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields})


def greedy(server, model: str) -> str | None:
    response = complete(server, model)
    return response.json()["choices"][0]["text"] if response.status_code == 200 else None


def served_version(server, model: str, stream: bool = False) -> str | None:
    """The adapter version a response names in its header."""
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120, json={
            "model": model, "prompt": PROMPT, "max_tokens": 2, "stream": stream}) as response:
        response.read()
        return response.headers.get("ptmoe-adapter-version")


def converges(condition, seconds: float = 20) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            CONVERGED.append(time.monotonic() - started)
            return True
        time.sleep(0.05)
    return False


def test_every_change_through_one_reaches_the_other(replicas, lab):
    first, second = replicas
    library = lab / "library"
    uploaded = upload(first, "tenant", library / "v0")
    assert uploaded.status_code == 200
    expected = greedy(first, "tenant")
    assert converges(lambda: greedy(second, "tenant") == expected)
    # Both name the version the store gave it, in streamed and whole responses alike; a
    # base-model response names none.
    version = str(uploaded.json()["version"])
    assert {served_version(s, "tenant", stream) for s in replicas for stream in (False, True)
            } == {version}
    base = httpx.get(f"{first.url}/v1/models").json()["data"][0]["id"]
    assert served_version(first, base) is None
    # Replaced: the second serves the new version, never the old one again.
    uploaded = upload(first, "tenant", library / "v1")
    assert uploaded.status_code == 200
    replaced = greedy(first, "tenant")
    assert replaced != expected
    assert converges(lambda: greedy(second, "tenant") == replaced)
    assert greedy(second, "tenant") == replaced
    assert served_version(second, "tenant") == str(uploaded.json()["version"]) > version
    # Unloaded without purge: the folder stays, and both servers stop serving it.
    assert admin(first).delete("/v1/adapters/tenant").status_code == 200
    assert converges(lambda: greedy(second, "tenant") is None)
    # Loaded again from its folder, then purged.
    assert admin(first).post("/v1/adapters", json={
        "name": "tenant", "path": str(lab / "store" / "tenant")}).status_code == 200
    assert converges(lambda: greedy(second, "tenant") == replaced)
    assert admin(first).delete("/v1/adapters/tenant", params={"purge": "true"}
                               ).status_code == 200
    assert converges(lambda: greedy(second, "tenant") is None)
    assert not (lab / "store" / "tenant").exists()


def test_two_uploads_of_one_name_at_once_end_with_both_serving_one_version(replicas, lab):
    first, second = replicas
    library = lab / "library"
    barrier = threading.Barrier(2)

    def racing_upload(args):
        server, folder = args
        barrier.wait()
        return upload(server, "raced", folder).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(racing_upload, [(first, library / "v1"), (second, library / "v2")])
                    ) == [200, 200]
    assert converges(lambda: greedy(first, "raced") == greedy(second, "raced") is not None)
    # The store holds one whole folder, and its adapter is what both serve.
    stored = sorted(p.name for p in (lab / "store").iterdir() if not p.name.startswith("."))
    assert stored == ["raced"]
    candidates = {}
    for name in ("v1", "v2"):
        assert upload(first, f"probe-{name}", library / name).status_code == 200
        candidates[name] = greedy(first, f"probe-{name}")
    assert greedy(first, "raced") in candidates.values()
    assert greedy(second, "raced") == greedy(first, "raced")
    assert served_version(first, "raced") == served_version(second, "raced") is not None
