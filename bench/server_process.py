"""Starting and stopping `ptmoe-serve serve` (or any server command) as a child process, as
users run it; shared by the benchmarks and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_server(args: list[str], log: Path, timeout: float = 600,
                 command: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> RunningServer:
    """Start a server on a free loopback port and wait until /health answers 200. `env` adds
    to this process's environment."""
    port = free_port()
    command = command or [sys.executable, "-m", "ptmoe_serve.cli", "serve"]
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port), *args],
                               stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, **(env or {})})
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{server.log_tail()}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
