"""The benchmark's own parts: workloads, metrics, ratios, plots, and a small run against the
real server."""

import asyncio
import json

import pytest

from bench.loadgen import RequestRecord, percentile, run_workload, summarize
from bench.plot import plot_results
from bench.run import medians, ratios
from bench.workload import WorkloadSpec, make_workload

CORPUS_IDS = list(range(1000, 1500))


def test_workload_is_deterministic_and_shaped_as_asked():
    spec = WorkloadSpec(num_adapters=16, num_requests=200, prompt_tokens=20, output_tokens=7)
    requests = make_workload(spec, CORPUS_IDS)
    assert requests == make_workload(spec, CORPUS_IDS)
    assert len(requests) == 200
    assert all(len(r.prompt_ids) == 20 and r.max_tokens == 7 for r in requests)
    assert all(0 <= r.adapter_index < 16 for r in requests)
    assert len({r.adapter_index for r in requests}) == 16
    assert all(r.send_at == 0 for r in requests)
    with pytest.raises(ValueError):
        make_workload(WorkloadSpec(1, 1, prompt_tokens=600), CORPUS_IDS)


def test_zipf_favours_the_first_adapters():
    spec = WorkloadSpec(num_adapters=256, num_requests=2000, popularity="zipf")
    counts = [0] * 256
    for r in make_workload(spec, CORPUS_IDS):
        counts[r.adapter_index] += 1
    assert counts[0] > 5 * 2000 / 256  # the most popular gets far more than a uniform share
    assert counts[0] > counts[10] > counts[200]


def test_poisson_arrivals_follow_the_rate():
    spec = WorkloadSpec(num_adapters=4, num_requests=4000, arrival="poisson", rate=8.0)
    times = [r.send_at for r in make_workload(spec, CORPUS_IDS)]
    assert times == sorted(times)
    assert times[-1] / len(times) == pytest.approx(1 / 8.0, rel=0.1)


def test_summary_metrics():
    records = [RequestRecord(0, True, ttft=0.1, latency=1.1, output_tokens=11),
               RequestRecord(1, True, ttft=0.3, latency=2.3, output_tokens=21),
               RequestRecord(2, False, error="HTTP 500")]
    summary = summarize(records, wall_seconds=4.0)
    assert summary["completed"] == 2 and summary["errors"] == 1
    assert summary["output_tokens_per_second"] == 8.0
    assert summary["requests_per_second"] == 0.5
    assert summary["ttft_p50"] == 0.1 and summary["ttft_p99"] == 0.3
    assert summary["tpot_p50"] == pytest.approx(0.1) and summary["tpot_p99"] == pytest.approx(0.1)
    assert summary["error_examples"] == ["HTTP 500"]
    assert percentile([], 0.5) is None
    assert percentile(list(range(101)), 0.99) == 99


def test_filler_makes_prompts_longer_without_a_shared_prefix():
    from bench.systems import with_filler

    assert with_filler([5, 6, 7], 4) == [5, 6, 7, 5, 5, 6, 7]
    assert with_filler([1, 2], 3)[:3] != with_filler([3, 4], 3)[:3]


def result(system, tok_s, tpot=0.05, length=None, round_index=1, n=16):
    return {"system": system, "prompt_length": length, "round": round_index,
            "output_tokens_per_second": tok_s, "tpot_p50": tpot, "ttft_p50": 0.5,
            "latency_p50": 2.0,
            "workload": {"num_adapters": n, "popularity": "uniform", "arrival": "closed"}}


def test_ratios_are_of_medians_over_rounds_at_the_same_soft_prompt_length(tmp_path):
    results = [
        # Three rounds each; one round of each hit by noise, which the median ignores.
        *(result("ptmoe", tok, 0.05, 16, k) for k, tok in enumerate([95.0, 60.0, 97.0], 1)),
        *(result("vllm", tok, 0.05, 16, k) for k, tok in enumerate([100.0, 100.0, 10.0], 1)),
        *(result("ptmoe", tok, 0.06, 40, k) for k, tok in enumerate([90.0, 90.0, 90.0], 1)),
        *(result("vllm", tok, 0.05, 40, k) for k, tok in enumerate([99.0, 100.0, 101.0], 1)),
        result("vllm-instruction", 60.0, 0.1), result("vllm-lora", 30.0),
        result("transformers", 3.0, None, 40),
    ]
    rows = {row["prompt_length"]: row for row in ratios(results)}
    assert rows[16]["vs_vllm"] == pytest.approx(95.0 / 100.0)
    assert rows[16]["tpot_vs_vllm"] == pytest.approx(1.0)
    # The instruction, LoRA and transformers peers are compared at the longest T only.
    assert "vs_vllm-instruction" not in rows[16]
    assert rows[40]["vs_vllm"] == pytest.approx(0.9)
    assert rows[40]["tpot_vs_vllm"] == pytest.approx(1.2)
    assert rows[40]["vs_vllm-instruction"] == pytest.approx(1.5)
    assert rows[40]["tpot_vs_vllm-instruction"] == pytest.approx(0.6)
    assert rows[40]["vs_vllm-lora"] == pytest.approx(3.0)
    assert rows[40]["vs_transformers"] == pytest.approx(30.0)
    assert "tpot_vs_transformers" not in rows[40]
    report = {"results": results, "medians": medians(results), "model": "m",
              "dtype": "bfloat16", "machine": {"cpus": 2}}
    plot_results(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_rotate_the_order_of_systems():
    from bench.run import rotated

    arms = ["a", "b", "c"]
    orders = [rotated(arms, k) for k in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    # Every system runs first once in three rounds.
    assert {order[0] for order in orders} == set(arms)


def test_instruction_peer_shares_one_prefix_and_pads_do_not():
    from bench.systems import Endpoint, instructed, padded
    from bench.workload import BenchRequest

    bare = Endpoint("http://x", lambda i: "m", lambda r: r.prompt_ids, {}, 0)
    first, second = BenchRequest(0, [5, 6, 7], 4, 0.0), BenchRequest(0, [8, 9], 4, 0.0)
    instruction = [1, 2, 3, 4]
    peer = instructed(bare, instruction)
    assert peer.prompt_ids(first) == [1, 2, 3, 4, 5, 6, 7]
    assert peer.prompt_ids(second)[:4] == instruction
    pads = padded(bare, 4)
    assert len(pads.prompt_ids(first)) == 7 and pads.info == {"extra_prompt_tokens": 4}
    assert pads.prompt_ids(first)[:4] != pads.prompt_ids(second)[:4]


def test_instruction_is_a_system_turn_of_about_500_tokens(tokenizer):
    from bench.workload import INSTRUCTION, instruction_ids

    ids = instruction_ids(tokenizer)
    assert 450 <= len(ids) <= 600
    assert INSTRUCTION in tokenizer.decode(ids)
    assert tokenizer.decode(ids).startswith("<|im_start|>system")


@pytest.mark.parametrize("arrival", ["closed", "poisson"])
def test_small_run_against_the_real_server(server, tokenizer, arrival):
    spec = WorkloadSpec(num_adapters=2, num_requests=6, prompt_tokens=12, output_tokens=4,
                        arrival=arrival, concurrency=3, rate=20.0)
    corpus = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 10)
    names = ["top1", "dense"]
    summary = asyncio.run(run_workload(server.url, make_workload(spec, corpus), spec,
                                       lambda i: names[i], deadline=120))
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["output_tokens"] == 6 * 4
    assert 0 < summary["ttft_p50"] <= summary["latency_p50"]
    json.dumps(summary)


def test_vllms_benchmark_client_drives_an_adapter(server, model_dir):
    """vLLM's own benchmark client (`vllm bench serve`) with an adapter as the model: every
    request completes with the tokens asked for."""
    import argparse

    from vllm.benchmarks import serve as vllm_bench

    parser = argparse.ArgumentParser()
    vllm_bench.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", server.url, "--endpoint", "/v1/completions",
        "--model", "top1", "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", "12", "--random-output-len", "4", "--num-prompts", "6",
        "--ignore-eos", "--max-concurrency", "3", "--disable-tqdm"])
    result = vllm_bench.main(args)
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 4


def test_fleet_simulation_places_by_policy():
    """One replica: every policy sees the same stream and the same hits. Eight: placing by
    residency finds adapters resident more often than round robin, and each request is
    counted once."""
    from bench.fleet import POLICIES, FleetSpec, simulate

    one = FleetSpec(replicas=1, cap=20, adapters=500, duration=60, warmup=20)
    results = [simulate(one, policy, cold_load_ms=5.0) for policy in POLICIES]
    assert len({(r["hit_rate"], r["requests"]) for r in results}) == 1
    assert 0 < results[0]["hit_rate"] < 1
    eight = FleetSpec(replicas=8, cap=20, adapters=500, duration=60, warmup=20)
    by_policy = {p: simulate(eight, p, cold_load_ms=5.0) for p in POLICIES}
    assert by_policy["resident-affinity"]["hit_rate"] > by_policy["round-robin"]["hit_rate"] + 0.1
    assert by_policy["round-robin"]["busiest_over_mean"] < 1.01
    for row in by_policy.values():
        assert abs(row["requests"] - 8 * 8.0 * 40) < 0.1 * 8 * 8.0 * 40
        assert row["added_ms_per_request"] == pytest.approx((1 - row["hit_rate"]) * 5.0)


def test_the_lora_affinity_score_is_llm_ds():
    """llm-d's lora-affinity-scorer on vLLM 0.32's gauge (an adapter in flight is in both
    lists): 1.0 where it runs, 0.8 where there is room, 0 where the replica is full."""
    from bench.fleet import Seen, lora_affinity

    seen = Seen(in_flight=3, running=frozenset({1, 2}), resident=frozenset(), max_lora=5)
    assert lora_affinity(1, seen) == 1.0
    assert lora_affinity(3, seen) == 0.8  # 2 running + 2 waiting < 5
    assert lora_affinity(3, Seen(3, frozenset({1, 2, 4}), frozenset(), 5)) == 0.0


def test_the_conversation_benchmark_reads_turn_one_apart_from_the_later_turns(tokenizer):
    from bench.conversations import questions, summarize, system_prompt

    assert 1000 <= len(tokenizer.encode(system_prompt(tokenizer, 1000))) < 1100
    assert questions(4, 3) == questions(4, 3) and len({q[0] for q in questions(32, 1)}) > 16
    rounds = [{"turn": 1, "seconds": 2.0, "ttft": [1.0, 3.0], "output_tokens": 32,
               "prefix_cache_queries": 1000, "prefix_cache_hits": 0},
              {"turn": 2, "seconds": 1.0, "ttft": [0.5, 0.7], "output_tokens": 32,
               "prefix_cache_queries": 1200, "prefix_cache_hits": 1024},
              {"turn": 3, "seconds": 1.0, "ttft": [0.6, 0.9], "output_tokens": 32,
               "prefix_cache_queries": 1400, "prefix_cache_hits": 1152}]
    summary = summarize(rounds, 4.0)
    assert summary["hit_rate_turn_1"] == 0.0
    assert summary["hit_rate_later_turns"] == (1024 + 1152) / 2600
    assert summary["output_tokens_per_second"] == 96 / 4.0
    assert summary["ttft_turn_1_p99"] == 3.0 and summary["ttft_later_turns_p99"] == 0.9


def test_a_results_file_records_the_machine_the_versions_and_the_commit():
    import subprocess

    from bench.provenance import CPU_FLAGS, provenance

    record = provenance("python -m bench.run --preset quick")
    assert record["command"] == "python -m bench.run --preset quick"
    machine, versions = record["machine"], record["versions"]
    assert machine["processor"] and machine["cpus"] >= 1 and machine["memory_gib"] > 1
    assert set(machine["cpu_flags"]) <= set(CPU_FLAGS)
    assert versions["torch"] and versions["transformers"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout
    assert head.startswith(versions["ptmoe_serve"].removesuffix("-dirty"))
    # A dirty checkout names its changed files; a clean one has none to name.
    assert ("uncommitted" in versions) == versions["ptmoe_serve"].endswith("-dirty")


def test_every_benchmark_that_writes_a_results_file_records_its_provenance():
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    writers = [p for p in bench.glob("*.py") if "write_text(json.dumps" in p.read_text()]
    assert len(writers) >= 10
    assert [p.name for p in writers if "provenance(" not in p.read_text()] == []


def test_the_figures_checker_finds_a_missing_a_stale_and_an_uncited_figure(tmp_path):
    import subprocess

    from bench.figures import citations, judge, uncited_results, uncited_tables

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "server.py").write_text("fast = True\n")
    (tmp_path / "bench" / "speed.py").write_text('MEASURES = ("code", "bench/speed.py")\n')
    (tmp_path / "bench" / "results" / "speed.json").write_text(
        json.dumps({"command": "python -m bench.speed --rounds 3", "results": []}))
    (tmp_path / "README.md").write_text("1.2x the peer (`bench/results/speed.png`).\n")
    (tmp_path / "Makefile").write_text(
        "bench:\n\t$(PY) -m bench.speed --rounds 3 --out bench/results/speed.json\n")
    (tmp_path / "BENCHMARKS.md").write_text(
        "# Benchmarks\n## Speed\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
        "From `bench/results/speed.json` and `bench/results/gone.json`.\n"
        "```bash\n# a comment, not a heading\n```\n"
        "## Hand-timed\n| a |\n| --- |\n| 3 |\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "measured")
    cited = citations(tmp_path)
    assert sorted(cited) == ["bench/results/gone.json", "bench/results/speed.json"]
    assert cited["bench/results/speed.json"].places == ["README.md:1", "BENCHMARKS.md:6"]
    assert judge(cited["bench/results/gone.json"], tmp_path).problems == ["missing"]
    fresh = judge(cited["bench/results/speed.json"], tmp_path)
    assert fresh.benchmark == "speed" and fresh.problems == []
    assert uncited_tables(tmp_path) == ["BENCHMARKS.md:10 Hand-timed"]
    assert uncited_results(tmp_path) == []
    (tmp_path / "bench" / "results" / "left-behind.json").write_text("{}")
    assert uncited_results(tmp_path) == ["bench/results/left-behind.json"]
    # A change to what the benchmark measures makes its figures stale; a change elsewhere not.
    (tmp_path / "notes.txt").write_text("unrelated\n")
    git("add", ".")
    git("commit", "-q", "-m", "unrelated")
    assert judge(cited["bench/results/speed.json"], tmp_path).problems == []
    (tmp_path / "code" / "server.py").write_text("fast = False\n")
    git("commit", "-q", "-am", "slower")
    stale = judge(cited["bench/results/speed.json"], tmp_path).problems
    assert len(stale) == 1 and stale[0].startswith("stale: what it measures changed in 1 commit since")
    # Uncommitted changes count where they touch what the benchmark measures, or where the
    # file does not say which they were.
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = [f"written from uncommitted changes ({head}-dirty)"]
    for changed, expected in [(["notes.txt"], []), (["code/server.py"], dirty), (None, dirty)]:
        versions = {"ptmoe_serve": f"{head}-dirty",
                    **({} if changed is None else {"uncommitted": changed})}
        (tmp_path / "bench" / "results" / "speed.json").write_text(json.dumps(
            {"command": "python -m bench.speed --rounds 3", "versions": versions}))
        assert judge(cited["bench/results/speed.json"], tmp_path).problems == expected, changed
    # A commit this history lacks cannot be compared with: it fails rather than passes.
    (tmp_path / "bench" / "results" / "speed.json").write_text(json.dumps(
        {"command": "python -m bench.speed --rounds 3", "versions": {"ptmoe_serve": "0123abc"}}))
    assert judge(cited["bench/results/speed.json"], tmp_path).problems == [
        "written at 0123abc, a commit not in this history"]
    # A file no Makefile line writes: a figure that `make bench` does not reproduce.
    (tmp_path / "Makefile").write_text("bench:\n\t$(PY) -m bench.speed --rounds 3\n")
    assert judge(cited["bench/results/speed.json"], tmp_path).problems[0] == (
        "no Makefile line runs bench.speed --out bench/results/speed.json")
