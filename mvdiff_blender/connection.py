"""Where the backend is and how to reach it, as plain data a worker thread may read.

Blender's preferences may only be read on the main thread, so operators snapshot them into a
:class:`Connection` before any thread starts. The URL rules live here too: users type
``localhost:8765``, ``http://gpu-box:8765/`` or an address with a path, and get one normal form.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..backend.protocol import is_loopback as host_is_loopback


class SetupError(RuntimeError):
    """A user-facing problem with the backend settings; ``fix`` says what to change."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def with_fix(err: BaseException) -> str:
    """The error's message with what to press or type, for every place an error is shown."""
    fix = getattr(err, "fix", "")
    return f"{err}. {fix}" if fix else str(err)


def normalise_url(text: str) -> str:
    """``host[:port][/path]`` with or without a scheme, as ``scheme://host:port[/path]``."""
    text = text.strip()
    if not text:
        raise SetupError("The backend URL is empty", "Enter the address the backend listens on")
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise SetupError(f"The backend URL must use http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise SetupError(f"The backend URL {text!r} has no host name")
    try:
        port = parts.port
    except ValueError:
        raise SetupError(f"The backend URL {text!r} has an invalid port") from None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def is_loopback(url: str) -> bool:
    """True when the URL's host is this machine (names are resolved, so ``localhost`` counts)."""
    return host_is_loopback(urllib.parse.urlsplit(url).hostname or "")


@dataclass(frozen=True)
class LocalLaunch:
    """What it takes to start the bundled backend on this machine."""

    python: str
    port: int
    model_args: tuple[str, ...]
    store: Path
    log: Path
    extension_root: Path
    offline: bool = False
    env: dict[str, str] = field(default_factory=dict)
    record_dir: Path | None = None  # where the started process is noted, for the next session to find


@dataclass(frozen=True)
class Connection:
    """The backend a job talks to; ``launch`` is set when the add-on may start it itself.

    ``local``: the backend is the one this add-on runs on this machine, so it must prove it
    (``backend_process.identify``) and its token is the one the add-on gave it at start."""

    url: str
    token: str | None = None
    launch: LocalLaunch | None = None
    timeout: float = 30.0
    local: bool = False

    def check_online_access(self, online_access: bool) -> None:
        """Blender's Allow Online Access switch covers every address that is not this machine."""
        if not online_access and not is_loopback(self.url):
            raise SetupError(
                f"Online access is off in Blender, so the add-on will not contact {self.url}",
                "Enable Preferences > System > Network > Allow Online Access, or use a local backend",
            )
