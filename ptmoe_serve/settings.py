"""One settings object, built from the command line and handed to the constructors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptmoe_serve.engine import EngineSettings


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineSettings
    adapters_dir: Path
    # Further folders that POST /v1/adapters may load from.
    allowed_adapter_roots: tuple[Path, ...] = ()
    routing_device: str = "cpu"
    # "auto": the fused Triton kernels on CUDA, else batched torch; "triton" or "torch" forces.
    routing_kernel: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_api_key: str | None = None
    metrics_need_key: bool = False
    max_upload_bytes: int = 64 * 1024 * 1024
    # Seconds between looks at the adapters folder; 0 turns the watching off.
    watch_interval: float = 2.0
    drain_timeout: float = 30.0
