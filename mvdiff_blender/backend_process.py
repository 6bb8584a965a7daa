"""The backend process the add-on starts on this machine, and its end when Blender quits.

The backend is the ``backend`` package shipped inside this extension, run by a Python that has
its requirements (torch, diffusers...). Blender's own Python never imports them. The process
gets its own session, writes its log to the extension's user folder, and is stopped when the
add-on is disabled or Blender exits, so no GPU memory outlives the Blender that asked for it.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path

from ..backend.client import BackendClient, BackendError
from .connection import LocalLaunch, SetupError

_started: subprocess.Popen | None = None
_started_launch: LocalLaunch | None = None


def command(launch: LocalLaunch) -> list[str]:
    args = [launch.python, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(launch.port),
            "--store", str(launch.store), *launch.model_args]
    if launch.offline and "--offline" not in args:
        args.append("--offline")
    return args


def check_python(python: str) -> None:
    if not python:
        raise SetupError("No Python is set for the backend",
                         "In the add-on's preferences, set Backend Python to a Python with the backend installed")
    if not Path(python).is_file():
        raise SetupError(f"The backend Python {python!r} does not exist", "Fix Backend Python in the preferences")


def start(launch: LocalLaunch) -> subprocess.Popen:
    """Start the backend unless the one this add-on started is still running; returns the process."""
    global _started, _started_launch
    if is_running():
        return _started
    check_python(launch.python)
    launch.store.mkdir(parents=True, exist_ok=True)
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **launch.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(launch.extension_root), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONHOME", None)  # Blender sets it for its own Python; the backend's Python needs its own
    env["PYTHONUNBUFFERED"] = "1"
    if launch.offline:
        env["HF_HUB_OFFLINE"] = "1"
    with open(launch.log, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(launch))}\n".encode())
        flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else {
            "start_new_session": True}
        _started = subprocess.Popen(command(launch), cwd=launch.extension_root, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, **flags)
    _started_launch = launch
    return _started


def is_running() -> bool:
    return _started is not None and _started.poll() is None


def wait_until_healthy(client: BackendClient, timeout: float = 120.0, poll: float = 0.25,
                       cancelled=lambda: False) -> dict:
    """Poll ``/v1/health`` until it answers; fails early, with the log's end, if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.health()
        except BackendError as err:
            if _started is not None and _started.poll() is not None:
                raise SetupError(f"The backend exited with code {_started.returncode} while starting:\n"
                                 f"{log_tail()}", "See the backend log; check Backend Python and the model") from None
            if cancelled():
                raise SetupError("Cancelled while the backend was starting") from None
            if time.monotonic() > deadline:
                raise SetupError(f"The backend did not answer within {timeout:.0f} s ({err.message})") from None
        time.sleep(poll)


def stop(timeout: float = 10.0) -> bool:
    """Stop the backend this add-on started; returns whether there was one to stop."""
    global _started
    process, _started = _started, None
    if process is None or process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
    return True


def log_tail(lines: int = 15) -> str:
    if _started_launch is None or not _started_launch.log.is_file():
        return ""
    text = _started_launch.log.read_text("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


atexit.register(stop)
