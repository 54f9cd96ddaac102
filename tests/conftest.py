from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. The switch is read when triton
# is first imported, which other libraries may do before any kernel test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.server_process import RunningServer, launch_server, wait_until_healthy
from helpers import reap_stopped, stop_later
from ptmoe_serve.base_model import default_cache_dir, ensure_default_model

# Fixtures that start real servers: a test using one is marked `server` (the fast tier,
# `pytest -m "not server"`, leaves them out).
SERVER_FIXTURES = frozenset({"server", "api_route_server", "routed_server",
                             "tensor_parallel_server", "data_parallel_server", "replicas",
                             "deployment"})
# The two servers most tests share (defined below), and either of them.
SHARED_SERVERS = frozenset({"server", "api_route_server", "routed_server"})


# Whether this run has two pytest workers (`make test`), each with its own servers.
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ

# A GiB of KV cache for every engine the suite starts (vLLM's CPU build reads this in each
# engine and rank; the default is 2): up to eight engines run at once here, and vLLM refuses
# to start one when the machine's free memory is short of its cache. A GiB holds 23,000
# tokens of this model, more than any test asks at once.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_configure(config):
    config.pluginmanager.register(EndsServerLast())
    if not PARALLEL:
        return
    # `make test` runs two pytest workers (pytest-xdist), which share out the tests a server's
    # group at a time (`_server_group`). Every process then computes on one thread: OpenMP
    # threads spin-wait for each other, and a thread whose core the other worker took holds
    # up the rest (a 9 s test took 188 s so). Each worker's servers run their model on a core
    # of its own (vLLM's own choice would put both on the first).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if os.environ["PYTEST_XDIST_WORKER"] != "gw0" and (os.cpu_count() or 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str((os.cpu_count() or 1) - 1))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on a server of its module shows the end of that server's log: what the
    server did is most of what there is to know, and CI keeps no files."""
    report = yield
    if report.failed and call.when == "call":
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, RunningServer):
                report.sections.append((f"server log ({value.log})", value.log_tail(40)))
    return report


def pytest_sessionfinish(session):
    reap_stopped()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = SERVER_FIXTURES.intersection(item.fixturenames)
        if not used:
            continue
        item.add_marker(pytest.mark.server)
        item.add_marker(pytest.mark.xdist_group(_server_group(item, used)))


class EndsServerLast:
    """A test that ends its module's server (marked `ends_server`: it restarts or stops it)
    runs after the module's other tests, whatever order they run in."""

    @pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
    def pytest_collection_modifyitems(self, items):
        for item in [i for i in items if i.get_closest_marker("ends_server")]:
            items.remove(item)
            last = max((i for i, other in enumerate(items) if other.path == item.path),
                       default=len(items) - 1)
            items.insert(last + 1, item)


def _server_group(item, used: set[str]) -> str:
    """Which pytest worker a test runs in (`make test`: pytest-xdist's --dist loadgroup): the
    tests on the shared servers together, each module's own servers' tests together; tests
    without a server anywhere."""
    definitions = item._fixtureinfo.name2fixturedefs
    if any(definitions[name][-1].func.__module__ == __name__
           for name in SHARED_SERVERS.intersection(used)):
        return "shared"
    return item.path.stem


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

# name -> (the E2E adapter whose weights it has, its routing scope): chats routed on turn 1.
SCOPED_ADAPTERS = {"top1-first-turn": ("top1", "first_turn")}
# Every adapter in the shared servers' store.
STORE = [*E2E_ADAPTERS, *SHIPPED, *SCOPED_ADAPTERS]


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The independent reference: Hugging Face transformers' model, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


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
    for name, (source, scope) in SCOPED_ADAPTERS.items():
        shutil.copytree(folder / source, folder / name)
        config = folder / name / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "route_scope": scope}))
    return folder


SHARED_CACHE_VARIABLE = "PTMOE_TEST_SHARED_CACHE_DIR"


class SharedServers:
    """The two servers most tests share: the routing step in the engine, and in the API
    process. Both compile the model at their first start (minutes, on one core each), so the
    first one asked for starts the other too, when this session's tests need it."""

    ROUTES = {
        # As users start it, with vLLM's own serving flags for tool calls and compact JSON.
        "engine": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                   "--structured-outputs-config",
                   '{"backend": "xgrammar", "disable_any_whitespace": true}'],
        # vLLM's admission limit at four engine requests (one per prompt): its tests send one
        # request at a time, of up to four prompts. Fine-tuning is the other one's.
        "api": ["--max-num-queued-reqs", str(API_ROUTE_QUEUE_LIMIT), "--no-fine-tune-worker"],
    }
    FIXTURES = {"engine": ("server",), "api": ("api_route_server", "routed_server")}
    # vLLM's store of responses, for previous_response_id (off by default: it is unbounded).
    ENV = {"engine": {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}}

    def __init__(self, model_dir, adapters_dir, tmp_path_factory, session):
        self.model_dir, self.adapters_dir, self.tmp = model_dir, adapters_dir, tmp_path_factory
        # Their --cache-dir, where the first to start generates the admin key both use: the
        # tests' own, never the user's. In the environment, for the tests' modules, which
        # import this file as a module of its own (--import-mode=importlib).
        os.environ[SHARED_CACHE_VARIABLE] = str(tmp_path_factory.mktemp("shared-cache"))
        needed = {name for item in session.items for name in item.fixturenames}
        self.needed = {route for route, names in self.FIXTURES.items()
                       if needed.intersection(names)}
        self.launched, self.ready = {}, {}

    def get(self, route: str):
        if route not in self.ready:
            for other in sorted(self.needed | {route}, key=lambda r: r != route):
                if other not in self.launched and other not in self.ready:
                    self.launched[other] = self._launch(other)
            running = wait_until_healthy(self.launched.pop(route))
            assert routing_location_of(running) == route
            self.ready[route] = running
        return self.ready[route]

    def _launch(self, route: str):
        log = self.tmp.mktemp("server") / "server.log"
        return launch_server(["--model", str(self.model_dir), "--dtype", "float32",
                              "--cache-dir", os.environ[SHARED_CACHE_VARIABLE],
                              "--adapters", str(self.adapters_dir),
                              "--max-model-len", str(MAX_MODEL_LEN),
                              "--routing-location", route, *self.ROUTES[route]], log,
                             env=self.ENV.get(route))

    def stop(self):
        for running in [*self.ready.values(), *self.launched.values()]:
            stop_later(running)


@pytest.fixture(scope="session")
def shared_servers(model_dir, adapters_dir, tmp_path_factory, request):
    servers = SharedServers(model_dir, adapters_dir, tmp_path_factory, request.session)
    yield servers
    servers.stop()


def shared_admin_key_file() -> Path:
    """Where the shared servers generated their admin key (the server's log names it)."""
    assert SHARED_CACHE_VARIABLE in os.environ, "the shared servers have not started"
    return Path(os.environ[SHARED_CACHE_VARIABLE]) / "admin.key"


def admin_headers() -> dict[str, str]:
    """Management's credentials on the shared servers: the admin key generated at their first
    start, as a user without --admin-api-key finds it."""
    key = shared_admin_key_file().read_text().strip()
    return {"authorization": f"Bearer {key}"}


def routing_location_of(server) -> str:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    info = next(f for f in families if f.name == "ptmoe_server_info")
    return info.samples[0].labels["routing"]


@pytest.fixture(scope="session")
def server(shared_servers):
    """The server as users start it: on this model, the routing step runs in the engine, and
    vLLM compiles the model (its default, on the CPU too)."""
    return shared_servers.get("engine")


@pytest.fixture(scope="session")
def api_route_server(shared_servers):
    """The other route: soft prompts computed in the API process, handed over as embeddings."""
    return shared_servers.get("api")


@pytest.fixture(params=["engine", "api"])
def routed_server(request):
    """Both routes of the routing step: in vLLM's workers, and through prompt embeddings."""
    return request.getfixturevalue("server" if request.param == "engine" else "api_route_server")
