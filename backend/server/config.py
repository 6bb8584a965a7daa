"""How a backend server is set up: address, token, names it answers to, job store, limits, models.

Every limit the server applies lives here with its default, so ``serve``'s options, the routes
and the tests read one definition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..models.serving import ModelConfig
from ..protocol import (  # noqa: F401 - the env names are re-exported for the command line
    INSTANCE_ENV,
    TOKEN_ENV,
    is_loopback,
)
from ..validation import InputError

DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_BYTES = 512 * 2**20
DEFAULT_STORE = Path(os.environ.get("MVDIFF_STORE", "~/.cache/mvdiff-backend")).expanduser()
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MIN_TOKEN_LENGTH = 8
DEFAULT_UPLOAD_TIMEOUT = 600.0  # seconds for a whole upload


@dataclass(frozen=True)
class JobLimits:
    """What one job may ask for; a job over a limit is refused at submission, naming the field.

    ``max_job_bytes`` bounds the memory a job is estimated to need on the host (its views, depth
    maps, texture and mesh arrays as the pipelines allocate them); the others bound single fields
    so that a small upload cannot declare an enormous allocation.
    """

    max_views: int = 2048
    max_view_pixels: int = 2048 * 2048
    max_view_side: int = 4096
    max_texture_size: int = 8192
    max_triangles: int = 4_000_000
    max_vertices: int = 4_000_000
    max_objects: int = 4096
    max_job_bytes: int = 24 * 2**30

    def validated(self) -> JobLimits:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(name, f"must be a positive integer, got {value!r}")
        return self


@dataclass(frozen=True)
class Retention:
    """Finished jobs (done, failed, cancelled, interrupted) are deleted after ``keep_days``, and
    beyond the newest ``keep_jobs``; None keeps them. Queued and running jobs are never pruned."""

    keep_days: float | None = 30.0
    keep_jobs: int | None = 500

    def validated(self) -> Retention:
        if self.keep_days is not None and not self.keep_days > 0:
            raise InputError("keep_days", f"must be > 0, got {self.keep_days}")
        if self.keep_jobs is not None and self.keep_jobs < 1:
            raise InputError("keep_jobs", f"must be at least 1, got {self.keep_jobs}")
        return self


@dataclass(frozen=True)
class ServerConfig:
    """``token``: required by every route but health; mandatory off the loopback address.

    ``public_names``: host names (with or without a port) the server answers to besides the
    loopback names and the address it listens on, e.g. the name a reverse proxy forwards. Any other
    ``Host`` header is refused, so a web page that rebinds its own name to 127.0.0.1 gets nothing.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    store: Path = DEFAULT_STORE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_unpacked_bytes: int = 4 * DEFAULT_MAX_BODY_BYTES
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT
    upload_idle_timeout: float = 30.0  # seconds without a byte before an upload is dropped
    public_names: tuple[str, ...] = ()
    instance_id: str = ""
    limits: JobLimits = field(default_factory=JobLimits)
    retention: Retention = field(default_factory=Retention)
    models: ModelConfig = field(default_factory=ModelConfig)

    def validated(self) -> ServerConfig:
        check_token(self.token, self.host)
        if not 0 <= self.port < 65536:
            raise InputError("port", f"must lie in [0, 65535], got {self.port}")
        if self.max_body_bytes <= 0:
            raise InputError("max_body_bytes", "must be positive")
        if not self.upload_timeout > 0 or not self.upload_idle_timeout > 0:
            raise InputError("upload_timeout", "must be positive")
        self.limits.validated()
        self.retention.validated()
        return self

    def allowed_hosts(self) -> frozenset[str] | None:
        """Host names (lower case, without port) the server answers to; None: any (a wildcard
        address with a token, where the token, not the name, keeps strangers out)."""
        names = {*LOOPBACK_HOSTS, *(_host_only(n) for n in self.public_names)}
        if self.host in WILDCARD_HOSTS:
            if not self.public_names:
                return None
        else:
            names.add(self.host.lower())
        return frozenset(names)


def check_token(token: str | None, host: str) -> None:
    """A token that guards something: not blank, not padded, long enough; required off loopback."""
    if token is not None and not token.strip():
        raise InputError("token", "is empty or only whitespace")
    if token is not None and token != token.strip():
        raise InputError("token", "must not start or end with whitespace")
    if not is_loopback(host) and not token:
        raise InputError("token", f"listening on {host} lets other machines in: set a token (--token-file or "
                                  f"{TOKEN_ENV})")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError("token", f"must be at least {MIN_TOKEN_LENGTH} characters")


def _host_only(name: str) -> str:
    """``gpu-box:8765`` -> ``gpu-box``; ``[::1]:80`` -> ``::1``."""
    name = name.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    if name.count(":") == 1:
        return name.partition(":")[0]
    return name


def read_token(token_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The token from ``token_file`` (its first line) or else ``$MVDIFF_TOKEN``; None when neither."""
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            text = Path(token_file).expanduser().read_text("utf-8")
        except OSError as err:
            raise InputError("token_file", f"cannot be read ({err.strerror or err})") from None
        lines = text.splitlines()
        return lines[0] if lines else ""
    return environ.get(TOKEN_ENV) or None
