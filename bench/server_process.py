"""Starting and stopping `ptmoe-serve serve` (or any server command) as a child process, as
users run it; shared by the benchmarks and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# How many times a server is started again on another port when the one chosen was taken
# before it bound it (another process starting a server at the same moment).
PORT_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path
    # What started it, to start it again on another port.
    command: list[str] = field(default_factory=list, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_server(args: list[str], log: Path, timeout: float = 600,
                 command: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> RunningServer:
    """Start a server on a free loopback port and wait until /health answers 200. `env` adds
    to this process's environment."""
    return wait_until_healthy(launch_server(args, log, command, env), timeout)


def launch_server(args: list[str], log: Path, command: list[str] | None = None,
                  env: dict[str, str] | None = None) -> RunningServer:
    """Start a server on a free loopback port, without waiting for it (wait_until_healthy)."""
    command = [*(command or [sys.executable, "-m", "ptmoe_serve.cli", "serve"]), *args]
    return _launch(command, {**os.environ, **(env or {})}, log)


def _launch(command: list[str], env: dict[str, str], log: Path) -> RunningServer:
    port = free_port()
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    return RunningServer(f"http://127.0.0.1:{port}", process, log, command, env)


def wait_until_healthy(server: RunningServer, timeout: float = 600) -> RunningServer:
    """`server` (or the same server started again on another port, if its port was taken)
    once /health answers 200."""
    deadline = time.monotonic() + timeout
    for _ in range(PORT_TRIES):
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                tail = server.log_tail()
                if "Address already in use" not in tail:
                    raise RuntimeError(f"server exited with {server.process.returncode}:\n{tail}")
                server = _launch(server.command, server.env, server.log)
                break
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            stop_server(server)
            raise RuntimeError(f"server did not become healthy in {timeout} s:\n"
                               f"{server.log_tail()}")
    raise RuntimeError(f"no free port after {PORT_TRIES} tries:\n{server.log_tail()}")


def stop_server(server: RunningServer, wait: bool = True) -> None:
    """SIGTERM to the server, which stops its engine and lets running requests finish, as
    `kill` or `docker stop` do; whatever of its process group is left after a minute is
    killed. `wait=False` returns at once (reap it later with `reap_server`)."""
    if server.process.poll() is None:
        server.process.terminate()
    if wait:
        reap_server(server)


def reap_server(server: RunningServer) -> None:
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait()
