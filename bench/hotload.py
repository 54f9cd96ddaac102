"""Hot-load benchmark: how fast a new adapter serves while traffic runs.

Starts the server on the default model, keeps `--traffic` streaming clients busy on resident
adapters, then loads `--loads` new adapters of the paper's shape one after another (alternating
an upload, PUT, and a load from a folder, POST) and times each: the server's own load time, the
call's round trip, and the time from the call to the new adapter's first streamed token,
beside the first-token time of an adapter resident all along, measured under the same traffic.

    python -m bench.hotload --loads 200 --traffic 4 --out bench/results/hotload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.adapters import write_ptmoe_adapters
from bench.loadgen import percentile
from bench.provenance import provenance
from bench.server_process import start_server, stop_server
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from ptmoe_serve.base_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

# What this benchmark's figures depend on (bench/figures.py: a file is stale once they change).
MEASURES = ("server", "bench/hotload.py", "bench/adapters.py")

PROMPT = "Tell me a short story about a robot who learns to paint."


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 0.50), "p99": percentile(values, 0.99),
            "mean": statistics.fmean(values), "max": max(values), "n": len(values)}


async def first_token_seconds(client: httpx.AsyncClient, model: str, max_tokens: int) -> float:
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}) as response:
        response.raise_for_status()
        first = None
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    return first


async def run(url: str, admin_key: str, library: list[Path], loads: int, traffic: int) -> dict:
    # Management and inference on one client: the admin key is accepted as an API key too.
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 headers={"authorization": f"Bearer {admin_key}"}) as client:
        resident = [f"resident{i}" for i in range(max(traffic, 1))]
        for name, folder in zip(resident, library):
            (await client.post("/v1/adapters", json={"name": name, "path": str(folder)})
             ).raise_for_status()
        stop = asyncio.Event()
        served = [0]

        async def background(i: int) -> None:
            while not stop.is_set():
                await first_token_seconds(client, resident[i % len(resident)], 32)
                served[0] += 1

        workers = [asyncio.create_task(background(i)) for i in range(traffic)]
        await asyncio.sleep(2)
        server_ms, call_ms, to_first_token_ms, methods, resident_ms = [], [], [], [], []
        try:
            for i in tqdm(range(loads), desc="hot loads"):
                folder = library[len(resident) + i % (len(library) - len(resident))]
                name = f"hot{i}"
                started = time.perf_counter()
                if i % 2 == 0:
                    files = {f: (f, (folder / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
                    response = await client.put(f"/v1/adapters/{name}", files=files)
                else:
                    response = await client.post("/v1/adapters",
                                                 json={"name": name, "path": str(folder)})
                response.raise_for_status()
                call_ms.append(1000 * (time.perf_counter() - started))
                server_ms.append(response.json()["load_ms"])
                methods.append("PUT" if i % 2 == 0 else "POST")
                first = await first_token_seconds(client, name, 1)
                to_first_token_ms.append(call_ms[-1] + 1000 * first)
                # The same request to an adapter resident all along, under the same traffic.
                resident_ms.append(1000 * await first_token_seconds(client, resident[0], 1))
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        info = (await client.get("/v1/adapters/hot0")).json()
    return {
        "loads": loads,
        "background_streams": traffic,
        "background_requests_served": served[0],
        "server_load_ms": percentiles(server_ms),
        "server_load_ms_put": percentiles([v for v, m in zip(server_ms, methods) if m == "PUT"]),
        "server_load_ms_post": percentiles([v for v, m in zip(server_ms, methods) if m == "POST"]),
        "call_round_trip_ms": percentiles(call_ms),
        "call_to_first_token_ms": percentiles(to_first_token_ms),
        "resident_first_token_ms": percentiles(resident_ms),
        "adapter": {k: info[k] for k in ("num_experts", "prompt_length", "rank", "hidden_size",
                                         "num_parameters", "bytes_on_device")},
        "adapters_per_gib": 2**30 // info["bytes_on_device"],
        # Every load's figures, in the order they ran.
        "each_load": {"method": methods, "server_load_ms": server_ms, "call_round_trip_ms": call_ms,
                      "call_to_first_token_ms": to_first_token_ms,
                      "resident_first_token_ms": resident_ms},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=200)
    parser.add_argument("--traffic", type=int, default=4, help="background streaming clients")
    parser.add_argument("--library-size", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=40)
    parser.add_argument("--num-experts", type=int, default=2)
    parser.add_argument("--rank", type=int, default=36)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hotload.json"))
    args = parser.parse_args()

    model_dir = ensure_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        library = write_ptmoe_adapters(work_dir / "library", model_dir, DEFAULT_MODEL_NAME,
                                       args.library_size, args.prompt_length, args.num_experts,
                                       args.rank)
        admin_key = secrets.token_urlsafe(16)
        (work_dir / "admin.key").write_text(admin_key)
        server = start_server(["--model", str(model_dir), "--dtype", args.dtype,
                               "--adapters", str(work_dir / "store"),
                               "--allow-adapter-path", str(work_dir / "library"),
                               "--admin-api-key-file", str(work_dir / "admin.key")],
                              work_dir / "server.log")
        try:
            result = asyncio.run(run(server.url, admin_key, library, args.loads, args.traffic))
        finally:
            stop_server(server)
    result = {**provenance("python -m bench.hotload " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
