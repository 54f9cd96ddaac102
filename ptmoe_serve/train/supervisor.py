"""Keeps the fine-tuning worker's process running beside the server: when it dies (the kernel's
OOM killer, a crash, a kill), another is started after a backoff that doubles while workers
keep dying young, and the job it ran resumes from its last checkpoint. A deployment that runs
its workers apart (`serve --no-fine-tune-worker`) gives them the same from systemd or
Kubernetes (deploy/)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable

logger = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
# A worker that lived this long died of its job, not of its start: the backoff starts again.
HEALTHY_SECONDS = 60.0
POLL_SECONDS = 0.5
# How long the worker may take to finish its training step when the server stops.
STOP_SECONDS = 60


class WorkerSupervisor:
    def __init__(self, command: list[str], on_restart: Callable[[], None] = lambda: None):
        self.command = command
        self.on_restart = on_restart
        self.process: subprocess.Popen | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            while (code := self.process.poll()) is None:
                await asyncio.sleep(POLL_SECONDS)
            lived = loop.time() - started
            backoff = FIRST_BACKOFF_SECONDS if lived >= HEALTHY_SECONDS else backoff
            logger.warning("the fine-tuning worker (pid %d) %s after %.0f s; starting another "
                           "in %.0f s", self.process.pid, _ending(code), lived, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)
            self.process = subprocess.Popen(self.command)
            self.on_restart()

    async def stop(self) -> None:
        """Stop watching, then the worker: it stops after its step (its job resumes at the
        next start), or is killed after STOP_SECONDS."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


def _ending(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
