"""One settings object, built from the command line and handed to the constructors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptmoe_serve.engine import EngineSettings


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineSettings
    adapters_dir: Path
    routing_device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
