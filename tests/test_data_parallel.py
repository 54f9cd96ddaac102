"""vLLM's data parallelism through the server: two engines behind one API process, each
with its own worker holding the banks; requests spread over both answer as transformers does
(in float32, greedy), for an adapter from start-up and one uploaded while serving."""

import httpx
import pytest

from test_e2e_greedy import MAX_TOKENS, PROMPTS, transformers_greedy

ADMIN = "data-parallel-admin-key"


@pytest.fixture(scope="module")
def data_parallel_server(model_dir, adapters_dir, tmp_path_factory):
    """vLLM's data parallelism: two engines behind one API process, each with its own worker
    holding the banks, over a store of its own (one adapter at start-up)."""
    import shutil

    from bench.server_process import start_server
    from helpers import stop_later
    from conftest import MAX_MODEL_LEN, routing_location_of

    store = tmp_path_factory.mktemp("dp-store")
    shutil.copytree(adapters_dir / "dense", store / "dense")
    (store.parent / "dp-admin.key").write_text(ADMIN)
    running = start_server(
        ["--model", str(model_dir), "--dtype", "float32", "--adapters", str(store),
         "--admin-api-key-file", str(store.parent / "dp-admin.key"),
         "--max-model-len", str(MAX_MODEL_LEN), "--data-parallel-size", "2",
         "--enforce-eager",  # two engines compiling on two cores would take minutes
         "--no-fine-tune-worker"],
        tmp_path_factory.mktemp("dp") / "server.log",
        # One OpenMP thread an engine, as for tensor-parallel ranks (test_e2e_greedy.py).
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
             "OMP_NUM_THREADS": "1"})
    assert routing_location_of(running) == "engine"
    yield running
    stop_later(running)


def test_data_parallel_engines_each_route_exactly(data_parallel_server, hf_model, tokenizer,
                                                  adapters_dir):
    """An adapter loaded at start-up and one uploaded while serving reach both engines'
    workers: requests spread over both answer as transformers does."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE

    url = data_parallel_server.url
    folder = adapters_dir / "contact-card"
    uploaded = httpx.put(f"{url}/v1/adapters/contact-card", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60,
                         files={f: (f, (folder / f).read_bytes())
                                for f in (CONFIG_FILE, WEIGHTS_FILE)})
    assert uploaded.status_code == 200, uploaded.text
    prompts = [tokenizer.encode(p) for p in PROMPTS] * 2

    def complete(args):
        model, ids = args
        response = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    for model in ["dense", "contact-card"]:
        # Eight at once: vLLM's balancer spreads them over the two engines.
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(complete, [(model, ids) for ids in prompts]))
        for ids, answer in zip(prompts, answers):
            assert answer == transformers_greedy(hf_model, adapters_dir, model, ids)
    served = {sample.labels["engine"]
              for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for sample in family.samples
              if sample.name == "vllm:request_success_total" and sample.value > 0}
    assert served == {"0", "1"}
