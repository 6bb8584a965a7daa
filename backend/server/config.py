"""How a backend server is set up: address, token, job store, limits, models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..models.serving import ModelConfig
from ..protocol import is_loopback
from ..validation import InputError

DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_BYTES = 512 * 2**20
DEFAULT_STORE = Path(os.environ.get("MVDIFF_STORE", "~/.cache/mvdiff-backend")).expanduser()
TOKEN_ENV = "MVDIFF_TOKEN"


@dataclass(frozen=True)
class ServerConfig:
    """``token``: required by every route but health; mandatory off the loopback address."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    store: Path = DEFAULT_STORE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_unpacked_bytes: int = 4 * DEFAULT_MAX_BODY_BYTES
    models: ModelConfig = field(default_factory=ModelConfig)

    def validated(self) -> ServerConfig:
        if not is_loopback(self.host) and not self.token:
            raise InputError(
                "token",
                f"listening on {self.host} lets other machines in: set a token (--token or {TOKEN_ENV})",
            )
        if self.token is not None and len(self.token) < 8:
            raise InputError("token", "must be at least 8 characters")
        if not 0 <= self.port < 65536:
            raise InputError("port", f"must lie in [0, 65535], got {self.port}")
        if self.max_body_bytes <= 0:
            raise InputError("max_body_bytes", "must be positive")
        return self
