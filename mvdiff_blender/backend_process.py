"""The backend process the add-on starts on this machine, and its end when Blender quits.

The backend is the ``backend`` package shipped inside this extension, run by a Python that has
its requirements (torch, diffusers...). Blender's own Python never imports them. The process
gets its own session, writes its log to the extension's user folder, and is stopped when the
add-on is disabled or Blender exits, so no GPU memory outlives the Blender that asked for it.

The settings a backend was started with are kept: when the preferences change (another model,
device or port), the next job or Start stops it and starts one with the new settings. A record
file (:mod:`.process_record`) lets the next Blender session find a backend that a crashed session
left running, and stop or adopt it.

Each start gets a random access token and instance id, passed in the environment (never on the
command line, in a URL or in the log). The token keeps web pages and other local users out; the
instance id, reported by ``/v1/version``, tells this add-on's backend from another program that
happens to listen on the configured port, which is refused with a clear message instead of being
sent the user's scene.
"""

from __future__ import annotations

import atexit
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

from ..backend.client import BackendClient, BackendError
from ..backend.protocol import INSTANCE_ENV, TOKEN_ENV
from . import process_record
from .connection import LocalLaunch, SetupError

_started: subprocess.Popen | None = None
_started_launch: LocalLaunch | None = None
_started_token: str = ""  # the started backend's access token and instance id (see the module's doc)
_started_instance: str = ""
_adopted: process_record.Record | None = None  # an earlier session's backend the user chose to use
_orphan: process_record.Record | None = None  # an earlier session's backend the user has not decided on
_record_dir: Path | None = None


def _record_file(port: int) -> Path | None:
    return None if _record_dir is None else process_record.record_file(_record_dir, port)


def command(launch: LocalLaunch) -> list[str]:
    args = [launch.python, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(launch.port),
            "--store", str(launch.store), *launch.model_args]
    if launch.offline and "--offline" not in args:
        args.append("--offline")
    return args


def check_python(python: str) -> None:
    if not python:
        raise SetupError("No Python is set for the backend",
                         "In Edit > Preferences > Add-ons > MVDiffusion Texturing, set Backend Python to a Python "
                         "with the backend installed (see the README)")
    if not Path(python).is_file():
        raise SetupError(f"The backend Python {python!r} does not exist",
                         "In Edit > Preferences > Add-ons > MVDiffusion Texturing, fix Backend Python")


def settings(launch: LocalLaunch) -> tuple:
    """What makes two launches the same backend: the whole command line (Python, port, models,
    weights, device, store, offline) and the extra environment."""
    return tuple(command(launch)), tuple(sorted(launch.env.items()))


def running_settings() -> tuple | None:
    """:func:`settings` of the backend this add-on runs (started or adopted), or None."""
    if not is_running():
        return None
    if _started is not None:
        return settings(_started_launch)
    return _adopted.command, ()


def matches(launch: LocalLaunch) -> bool:
    """The running backend was started with exactly these settings."""
    current = running_settings()
    if current is None:
        return False
    if _started is None:  # adopted: its environment is unknown, its command line is recorded
        return current[0] == settings(launch)[0]
    return current == settings(launch)


def is_stale(launch: LocalLaunch | None) -> bool:
    """A backend runs, but with other settings than ``launch`` (the preferences changed since)."""
    return launch is not None and is_running() and not matches(launch)


def start(launch: LocalLaunch) -> subprocess.Popen | None:
    """Make sure a backend with ``launch``'s settings runs; returns the process when this call started it.

    One started with other settings (the Model, Device or Port changed since) is stopped first, so
    no job ever reaches a backend that still holds the old model.
    """
    global _started, _started_launch, _record_dir, _started_token, _started_instance
    if is_running():
        if matches(launch):
            return _started
        stop()
    check_python(launch.python)
    check_no_orphan(launch.port)
    launch.store.mkdir(parents=True, exist_ok=True)
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **launch.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(launch.extension_root), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONHOME", None)  # Blender sets it for its own Python; the backend's Python needs its own
    env["PYTHONUNBUFFERED"] = "1"
    if launch.offline:
        env["HF_HUB_OFFLINE"] = "1"
    token, instance = secrets.token_urlsafe(32), uuid.uuid4().hex
    env[TOKEN_ENV], env[INSTANCE_ENV] = token, instance
    with open(launch.log, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(launch))}\n".encode())
        flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else {
            "start_new_session": True}
        _started = subprocess.Popen(command(launch), cwd=launch.extension_root, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, **flags)
    _started_launch, _started_token, _started_instance = launch, token, instance
    if launch.record_dir is not None:
        _record_dir = launch.record_dir
        process_record.write(_record_file(launch.port), process_record.Record(
            _started.pid, launch.port, time.time(), tuple(command(launch)),
            process_record.process_start_token(_started.pid), os.getpid(),
            process_record.process_start_token(os.getpid()), token, instance))
    return _started


def token() -> str | None:
    """The access token of the backend this add-on runs (started or adopted); None when it runs none."""
    if _started is not None:
        return _started_token or None
    if _adopted is not None:
        return _adopted.token or None
    return None


def _expected_instance() -> str | None:
    """The instance id the backend on the port must report; "" for an adopted backend recorded without one."""
    if _started is not None and _started.poll() is None:
        return _started_instance
    if _adopted is not None and process_record.pid_alive(_adopted.pid):
        return _adopted.instance_id
    return None


def foreign_backend(port: int, detail: str = "") -> SetupError:
    """The error for a port that another program holds."""
    extra = f" ({detail})" if detail else ""
    return SetupError(
        f"Another program is listening on port {port}; it is not the backend this add-on started{extra}",
        "Stop that program, or choose another Port in the add-on's preferences. To use a backend you started "
        "yourself, set the Backend to Remote with its URL and token")


def identify(client: BackendClient) -> dict:
    """``/v1/version`` of the backend at ``client``'s address, after checking it is the one this add-on runs.

    Sets ``client.token`` to that backend's token. Raises :class:`BackendError` (status 0) when
    nothing answers, and :class:`SetupError` when something that is not ours does."""
    port = urllib.parse.urlsplit(client.url).port or 80
    expected = _expected_instance()
    client.token = token()
    try:
        info = client.version()
    except BackendError as err:
        if err.status == 0:
            raise
        raise foreign_backend(port, f"it answered HTTP {err.status}") from None
    if expected is None:
        raise foreign_backend(port)
    if expected and info.get("instance_id") != expected:
        raise foreign_backend(port, "another backend, or an earlier one")
    return info


def is_running() -> bool:
    """The backend this add-on started, or one it adopted from an earlier session, is alive."""
    if _started is not None:
        return _started.poll() is None
    return _adopted is not None and process_record.pid_alive(_adopted.pid)


# ---------------------------------------------------------------------- a backend from an earlier session
def scan(record_dir: Path) -> process_record.Record | None:
    """Look for a backend an earlier Blender session started and left running (it crashed or was killed).

    A record whose process is gone, or whose pid now belongs to another program, is removed
    silently; one whose Blender still runs belongs to that session and is left alone. The orphan
    found is kept for :func:`orphan`, :func:`stop_orphan` and :func:`adopt_orphan`.
    """
    global _orphan, _record_dir
    _record_dir = record_dir
    _orphan = None
    ours = {p.pid for p in (_started, _adopted) if p is not None}
    for path in process_record.record_files(record_dir):
        record = process_record.read(path)
        if record is None or record.pid in ours or process_record.owner_runs_elsewhere(record):
            continue
        if not process_record.is_our_backend(record):
            process_record.remove(path, record.pid)
            continue
        if _orphan is None:
            _orphan = record
    return _orphan


def orphan() -> process_record.Record | None:
    return _orphan


def check_no_orphan(port: int) -> None:
    """Refuse to start, or to send a job, while an earlier session's backend holds ``port`` undecided."""
    global _orphan
    if _orphan is None or _orphan.port != port:
        return
    if not process_record.is_our_backend(_orphan):
        _orphan = None  # it ended meanwhile
        return
    raise SetupError(f"A backend from an earlier Blender session is running on port {port}",
                     "In the MVDiffusion > Backend panel (or the add-on's preferences), press Stop It to end it "
                     "or Use It to keep it")


def stop_orphan(timeout: float = 10.0) -> bool:
    """Stop the earlier session's backend; returns False (and kills nothing) if it is no longer ours."""
    global _orphan
    record, _orphan = _orphan, None
    if record is None:
        return False
    stopped = process_record.terminate(record, timeout)
    if _record_file(record.port) is not None:
        process_record.remove(_record_file(record.port), record.pid)
    return stopped


def adopt_orphan() -> bool:
    """Use the earlier session's backend as if this session had started it (it stops with Blender)."""
    global _orphan, _adopted
    record = _orphan
    if record is None or not process_record.is_our_backend(record):
        _orphan = None
        return False
    stop()
    _orphan, _adopted = None, record
    return True


def wait_until_healthy(client: BackendClient, timeout: float = 120.0, poll: float = 0.25,
                       cancelled=lambda: False) -> dict:
    """Poll until the backend this add-on started answers as itself (see :func:`identify`); returns its
    ``/v1/version``. Fails early, with the log's end, if the process died (a taken port among the causes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return identify(client)
        except (BackendError, SetupError) as err:
            if _started is not None and _started.poll() is not None:
                if isinstance(err, SetupError):
                    raise err from None
                raise SetupError(f"The backend exited with code {_started.returncode} while starting:\n"
                                 f"{log_tail()}", "See the backend log; check Backend Python and the model") from None
            if cancelled():
                raise SetupError("Cancelled while the backend was starting") from None
            if time.monotonic() > deadline:
                reason = err.message if isinstance(err, BackendError) else str(err)
                raise SetupError(f"The backend did not answer within {timeout:.0f} s ({reason})") from None
        time.sleep(poll)


def stop(timeout: float = 10.0) -> bool:
    """Stop the backend this add-on started or adopted; returns whether there was one to stop."""
    global _started, _adopted
    process, _started, launch = _started, None, _started_launch
    adopted, _adopted = _adopted, None
    if adopted is not None:
        stopped = process_record.terminate(adopted, timeout)
        if _record_file(adopted.port) is not None:
            process_record.remove(_record_file(adopted.port), adopted.pid)
        return stopped
    if process is None:
        return False
    try:
        if process.poll() is not None:
            return False
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        return True
    finally:
        if _record_file(launch.port) is not None:
            process_record.remove(_record_file(launch.port), process.pid)


def log_tail(lines: int = 15) -> str:
    if _started_launch is None or not _started_launch.log.is_file():
        return ""
    text = _started_launch.log.read_text("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


atexit.register(stop)
