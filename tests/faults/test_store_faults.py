"""The store's faults, made for real against a real server: the store on a size-limited tmpfs
(filled until writes fail with ENOSPC), remounted read-only, its lock held by another process,
its journal damaged, and processes SIGKILLed at named points of an upload, a replace, a purge
and an unload (failpoints, disk.py), one of them while the server runs; and changes that race
a cold load. Each checks the answer (status, code, message), that nothing acknowledged is lost,
that other adapters answer as before, and that a stream running meanwhile does not pause more
than ALLOWANCE beyond its worst gap measured just before and after the fault.

Mounting needs root (as on the build machines); elsewhere the module is skipped, saying why."""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.server_process import start_server
from conftest import TEXTS
from helpers import (fill_volume, lock_held_by_another_process, mount_tmpfs, random_adapter,
                     stop_later, text_experts_adapter, unmount)
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, adapter_files, write_adapter
from ptmoe_serve.adapters.journal import JOURNAL
from ptmoe_serve.adapters.store import STORE_LOCK
from ptmoe_serve.base_model import load_input_embeddings

ADMIN = "faults-admin-key"
PROMPT = "Once upon a time, there was a little"
LOCK_TIMEOUT = 1.0
# How long a stream runs before a fault, to measure its worst gap without one.
BASELINE_SECONDS = 3
# How much longer than that the stream may pause during a fault. Beside the other test worker
# (two servers and their engines on two cores) a stream paused once 1.79 s, 2.49 s into the
# full-disk fault, against a baseline of 0.36 s, while the same server answered another
# request 0.06 s into that pause: the machine's load, not a wait on the store (cause not yet
# found). A stall on the store is longer: the 12 s of the lock this suite was built against,
# and here a peer holds it to the test's end.
ALLOWANCE = 3.0
# Named points of a change at which a process doing only the store's work is killed: the
# change, and the adapter it changes.
KILLS = {
    "upload-staged": ("write", "new"),        # never became an adapter: not served
    "replace-retired": ("write", "replaced"),  # the old folder comes back
    "purge-deleting": ("purge", "purged"),     # gone at the rename: never restored half deleted
    "unload-manifest-written": ("unload", "unloaded"),  # the manifest said it: not served
}
STORE_WORK = """
import sys
from pathlib import Path
from ptmoe_serve.adapters.store import AdapterStore
store, action, name = AdapterStore(Path(sys.argv[1])), sys.argv[2], sys.argv[3]
if len(sys.argv) > 6:  # a replica ready before its change: told when to make it
    print("ready", flush=True)
    sys.stdin.readline()
if action == "write":
    store.write(name, Path(sys.argv[4]).read_bytes(), Path(sys.argv[5]).read_bytes())
else:
    store.record_unloaded(name, name if action == "purge" else None)
"""


def adapter_bytes(_root, seed: int) -> tuple[bytes, bytes]:
    """An adapter of the base model's width (576), as its two files' bytes."""
    return adapter_files(random_adapter(seed=seed, hidden_size=576, prompt_length=4, rank=4))


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, model_dir, tokenizer):
    root = tmp_path_factory.mktemp("faults")
    store = root / "store"
    store.mkdir()
    mount_tmpfs(store, "24m")
    table = load_input_embeddings(model_dir)
    texts = [tokenizer.encode(t) for t in TEXTS]
    for i, name in enumerate(["steady", "victim", "kept", "cold", "busy-a", "busy-b",
                              "replaced", "purged", "unloaded"]):
        write_adapter(text_experts_adapter(table, [texts[i % 3], texts[(i + 1) % 3]], seed=i,
                                           prompt_length=4, rank=4), store / name)
    (root / "admin.key").write_text(ADMIN)
    replaced_before = (store / "replaced" / WEIGHTS_FILE).read_bytes()
    for point, (action, name) in KILLS.items():
        sources = []
        if action == "write":
            sources = [root / "new.json", root / "new.safetensors"]
            for path, data in zip(sources, adapter_bytes(root, seed=40)):
                path.write_bytes(data)
        killed = subprocess.run([sys.executable, "-c", STORE_WORK, str(store), action, name,
                                 *map(str, sources)], env={**os.environ, "PTMOE_FAILPOINT": point},
                                capture_output=True)
        assert killed.returncode == -9, (point, killed.stderr.decode()[-2000:])
    yield {"root": root, "store": store, "replaced_before": replaced_before}
    unmount(store)


def server_args(lab, model_dir) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512",
            "--adapters", str(lab["store"]), "--admin-api-key-file", str(lab["root"] / "admin.key"),
            "--max-resident-adapters", "2", "--adapter-wait-seconds", "60",
            "--store-lock-timeout", str(LOCK_TIMEOUT), "--watch-interval", "0.5",
            "--enforce-eager", "--no-fine-tune-worker"]


@pytest.fixture(scope="module")
def server(lab, model_dir):
    running = start_server(server_args(lab, model_dir), lab["root"] / "server.log")
    yield running
    stop_later(running)


def admin(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120,
                        headers={"authorization": f"Bearer {ADMIN}"})


def complete(server, model: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True})


def upload(server, name: str, config: bytes, weights: bytes) -> httpx.Response:
    return admin(server).put(f"/v1/adapters/{name}", files={
        CONFIG_FILE: (CONFIG_FILE, config), WEIGHTS_FILE: (WEIGHTS_FILE, weights)})


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def writable_gauge(server) -> float:
    from bench.residency import metric
    return metric(server.url, "ptmoe_store_writable")


STREAM = """
import sys, time, httpx
url, tokens = sys.argv[1], int(sys.argv[2])
with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
        "model": "steady", "prompt": sys.argv[3], "max_tokens": tokens, "ignore_eos": True,
        "stream": True}) as response:
    print("status", response.status_code, flush=True)
    for line in response.iter_lines():
        if line.startswith("data: {"):
            print(time.monotonic(), flush=True)
"""


class Stream:
    """A streaming request for `steady` over the whole test, timing the gaps between its
    chunks: the worst in the seconds just before the fault and just after it is the baseline
    (what this machine's load makes of a stream: the other test worker shares its cores), and
    the worst during the fault must stay within `allowance` (ALLOWANCE) of it.

    The chunks are timed in a process of their own (CLOCK_MONOTONIC is one clock for all
    processes). Timed by a thread of the test's process, they waited whenever the test held
    the GIL: a full garbage collection of a process that has imported torch, transformers and
    vLLM holds it 0.45 s on an idle machine, and a test worker half-way through the suite, beside
    the other worker, paused such a thread 1.65 to 2.07 s, which read as the server's pauses."""

    def __init__(self, server, tokens: int = 400):
        self.process = subprocess.Popen([sys.executable, "-c", STREAM, server.url, str(tokens),
                                         PROMPT], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().split() == ["status", "200"]
        self.arrivals: list[float] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 60
        while not self.arrivals:
            assert time.monotonic() < deadline and self.process.poll() is None, "no chunk"
            time.sleep(0.05)

    def _read(self):
        for line in self.process.stdout:
            self.arrivals.append(float(line))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()

    def check(self, fault_began: float, fault_ended: float, allowance: float = ALLOWANCE,
              steps: tuple = ()) -> None:
        """`steps`: (what, when) the test did during the fault, named in a failure's message
        beside the gaps (each at its start, in seconds from the fault's)."""
        until = fault_ended + BASELINE_SECONDS
        while self.arrivals[-1] < until and self.process.poll() is None:
            time.sleep(0.1)
        self.close()
        self.reader.join()  # the pipe's end: every chunk it printed is counted
        assert self.arrivals[-1] >= until, "the stream ended too soon"
        pairs = list(zip(self.arrivals, self.arrivals[1:]))
        baseline = max(b - a for a, b in pairs if b <= fault_began or fault_ended <= a < until)
        # A gap that overlaps the fault at all is the fault's: a stall begins as it does.
        during = max(b - a for a, b in pairs if b > fault_began and a < fault_ended)
        gaps = [(round(a - fault_began, 2), round(b - a, 2)) for a, b in pairs
                if b - a > baseline]
        done = [(what, round(when - fault_began, 2)) for what, when in steps]
        assert during <= baseline + allowance, (during, baseline, gaps, done)


@pytest.fixture
def start_stream(server):
    """Starts the test's stream when called; it is stopped at the test's end, passed or not."""
    started = []

    def start() -> Stream:
        started.append(Stream(server))
        return started[-1]
    yield start
    for each in started:
        each.close()


def test_each_kill_at_a_named_point_is_recovered_at_start(server, lab):
    store = lab["store"]
    listed = admin(server).get("/v1/adapters", params={"limit": 100}).json()
    names = {a["name"] for a in listed["data"]}
    assert "new" not in names and "purged" not in names and "unloaded" not in names
    assert "replaced" in names and complete(server, "replaced").status_code == 200
    assert (store / "replaced" / WEIGHTS_FILE).read_bytes() == lab["replaced_before"]
    assert complete(server, "purged").status_code == 404
    assert complete(server, "unloaded").status_code == 404
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(
        (".staging-", ".retired-", ".purging-"))]
    assert leftovers == []


def test_an_unload_killed_after_its_manifest_reaches_the_running_server(server, lab):
    """The kill made while the server runs, as a replica dying mid-unload: the server follows
    the manifest (a stat each look) and stops serving the adapter without a restart."""
    assert upload(server, "doomed", *adapter_bytes(lab["root"], seed=41)).status_code == 200
    assert complete(server, "doomed").status_code == 200
    killed = subprocess.run([sys.executable, "-c", STORE_WORK, str(lab["store"]), "unload",
                             "doomed"], env={**os.environ,
                                             "PTMOE_FAILPOINT": "unload-manifest-written"},
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    deadline = time.monotonic() + 10
    while complete(server, "doomed").status_code != 404:
        assert time.monotonic() < deadline, "still served 10 s after the unload's manifest"
        time.sleep(0.25)
    assert complete(server, "kept").status_code == 200


def test_a_full_store_answers_507_keeps_serving_and_still_unloads(server, lab, start_stream):
    store = lab["store"]
    before = complete(server, "kept").json()["choices"][0]["token_ids"]
    stream = start_stream()
    time.sleep(BASELINE_SECONDS)
    began = time.monotonic()
    filler = fill_volume(store)
    steps = [("filled", time.monotonic())]
    try:
        refused = upload(server, "kept", *adapter_bytes(lab["root"], seed=50))
        steps.append(("upload refused", time.monotonic()))
        assert refused.status_code == 507, refused.text
        error = error_of(refused)
        assert error["code"] == "store_full" and str(store) in error["message"]
        assert "free space" in error["message"] and error["type"] == "InsufficientStorageError"
        assert writable_gauge(server) == 0
        steps.append(("gauge read", time.monotonic()))
        # Nothing lost: the old version answers as before, and nothing is left half written.
        assert complete(server, "kept").json()["choices"][0]["token_ids"] == before
        steps.append(("kept answered", time.monotonic()))
        assert not [p for p in store.iterdir() if p.name.startswith(".staging-")]
        # Unloads still work on a full disk: they free space, or use the space kept back.
        assert admin(server).delete("/v1/adapters/victim").status_code == 200
        steps.append(("victim unloaded", time.monotonic()))
        assert complete(server, "victim").status_code == 404
        steps.append(("victim 404", time.monotonic()))
    finally:
        filler.unlink()
    ended = time.monotonic()
    stream.check(began, ended, steps=steps)
    accepted = upload(server, "kept", *adapter_bytes(lab["root"], seed=50))
    assert accepted.status_code == 200, accepted.text
    assert writable_gauge(server) == 1


def test_a_read_only_store_refuses_changes_and_keeps_serving(server, lab, start_stream):
    store = lab["store"]
    # Asked once while the store takes writes: a first request records the adapter's version
    # in the store, which a read-only store refuses (503, README "Reliability").
    assert complete(server, "kept").status_code == 200
    stream = start_stream()
    time.sleep(BASELINE_SECONDS)
    began = time.monotonic()
    mount("-o", "remount,ro", str(store))
    try:
        for response in (admin(server).delete("/v1/adapters/kept"),
                         upload(server, "other", *adapter_bytes(lab["root"], seed=51)),
                         httpx.post(f"{server.url}/v1/unload_lora_adapter", json={
                             "lora_name": "kept"}, headers={"authorization": f"Bearer {ADMIN}"})):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            # vLLM's error shape writes paths as <path>; the project's own names the store.
            assert "adapter store" in response.text and "is read-only" in response.text
            assert str(store) in response.text or "<path>" in response.text
        assert error_of(admin(server).delete("/v1/adapters/kept"))["code"] == "store_read_only"
        # The unload the store refused changed nothing here.
        assert complete(server, "kept").status_code == 200
        assert admin(server).get("/v1/adapters/kept").status_code == 200
        assert writable_gauge(server) == 0
    finally:
        mount("-o", "remount,rw", str(store))
    stream.check(began, time.monotonic())
    assert admin(server).delete("/v1/adapters/kept").status_code == 200
    assert complete(server, "kept").status_code == 404


def test_a_peer_holding_the_lock_costs_a_bounded_wait_and_no_request_pauses(server, lab,
                                                                            start_stream):
    assert complete(server, "steady").status_code == 200  # warm
    stream = start_stream()
    time.sleep(BASELINE_SECONDS)
    # The peer holds the lock through the block: a request that waited on it could not be
    # answered while the peer lives.
    with lock_held_by_another_process(lab["store"] / STORE_LOCK) as peer:
        began = time.monotonic()
        busy = admin(server).delete("/v1/adapters/cold")
        waited = time.monotonic() - began
        assert busy.status_code == 503 and error_of(busy)["code"] == "store_busy", busy.text
        assert "locked by another process" in error_of(busy)["message"]
        assert busy.headers["retry-after"] == "1"
        assert LOCK_TIMEOUT <= waited < LOCK_TIMEOUT + 3
        # A request is not a change: answered while the peer still holds the lock. (Not timed:
        # beside the other test worker one took 2.92 s against 0.41 s just before it, so the
        # stream's gaps, checked below, are what show no request paused.)
        assert complete(server, "steady", max_tokens=1).status_code == 200
        assert peer.poll() is None, "the peer let go of the lock before the request was answered"
        ended = time.monotonic()
    stream.check(began, ended)
    assert complete(server, "cold").status_code == 200  # refused unload: still served


def _hold_slots(server, names, stop: threading.Event, started):
    def hold(i: int):
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300, json={
                "model": names[i], "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}) as response:
            for _ in response.iter_lines():
                started[i].set()
                if stop.is_set():
                    return
    return [threading.Thread(target=hold, args=(i,)) for i in range(len(names))]


@pytest.mark.parametrize("change", ["unload", "replace through a replica"])
def test_a_change_during_a_cold_loads_wait_wins(server, lab, change):
    """Both slots held by streams, a request for a cold adapter waits for one; the adapter is
    unloaded, or replaced by another process over the store (a replica), meanwhile."""
    name = f"race-{change.split()[0]}"
    first = adapter_bytes(lab["root"], seed=60)
    assert upload(server, name, *first).status_code == 200  # resident; the streams evict it
    replica = None
    if change != "unload":  # started (and its imports done) before the race
        sources = [lab["root"] / "r.json", lab["root"] / "r.safetensors"]
        for path, data in zip(sources, adapter_bytes(lab["root"], seed=61)):
            path.write_bytes(data)
        replica = subprocess.Popen([sys.executable, "-c", STORE_WORK, str(lab["store"]), "write",
                                    name, *map(str, sources), "wait"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert replica.stdout.readline().strip() == "ready"
    stop, started = threading.Event(), [threading.Event(), threading.Event()]
    holders = _hold_slots(server, ["busy-a", "busy-b"], stop, started)
    for thread in holders:
        thread.start()
    try:
        assert all(event.wait(60) for event in started)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(complete, server, name)
            time.sleep(1.5)
            assert not waiting.done()
            if change == "unload":
                assert admin(server).delete(f"/v1/adapters/{name}").status_code == 200
            else:
                replica.communicate("go\n", timeout=60)
                assert replica.returncode == 0
                time.sleep(2)  # the server's watcher sees it
            stop.set()
            answer = waiting.result()
    finally:
        stop.set()
        for thread in holders:
            thread.join()
    if change == "unload":
        assert answer.status_code == 404, answer.text
        assert admin(server).get(f"/v1/adapters/{name}").status_code == 404
        assert name not in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    else:
        assert answer.status_code == 200, answer.text
        version = json.loads(
            (lab["store"] / JOURNAL).read_text().splitlines()[-1].rsplit(',"crc"', 1)[0] + "}"
        )["version"]
        assert answer.headers["ptmoe-adapter-version"] == str(version)


@pytest.mark.ends_server
def test_damaged_journal_lines_and_a_read_only_volume_at_start(server, lab, model_dir):
    """The server stopped, its journal damaged, the volume remounted read-only (a
    ReadOnlyMany volume): it starts, serves what the store holds, and refuses changes."""
    expected = complete(server, "steady").json()["choices"][0]["token_ids"]
    stop_later(server)
    server.process.wait(timeout=120)
    with open(lab["store"] / JOURNAL, "ab") as f:
        f.write(b'{"version":Infinity,"name":"x"}\n{"version":1e400,"name":"y"}\n'
                b'{"version":3,"name":["z"]}\n\xff\xfe\n')
    mount("-o", "remount,ro", str(lab["store"]))
    try:
        again = start_server(server_args(lab, model_dir), lab["root"] / "server-ro.log")
        try:
            assert complete(again, "steady").json()["choices"][0]["token_ids"] == expected
            assert complete(again, "busy-a").status_code == 200
            refused = upload(again, "new-one", *adapter_bytes(lab["root"], seed=70))
            assert refused.status_code == 503 and error_of(refused)["code"] == "store_read_only"
            training_file = admin(again).post("/v1/files", data={"purpose": "fine-tune"}, files={
                "file": ("a.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
            assert training_file.status_code == 503, training_file.text
            assert error_of(training_file)["code"] == "store_read_only"
            assert writable_gauge(again) == 0
            assert "skipping a damaged line" in again.log.read_text()
        finally:
            stop_later(again)
            again.process.wait(timeout=120)
    finally:
        mount("-o", "remount,rw", str(lab["store"]))
