"""The note the add-on leaves about the backend process it started, and how to find it again.

A Blender that crashes or is killed never runs its exit handlers, so the backend it started keeps
running (and keeps its GPU memory). The add-on therefore writes a small JSON record (pid, port,
start time, command) when it starts a backend, and removes it when it stops one. The next Blender
session reads the record and offers to stop or use the process.

Pids are reused by the operating system, so a record alone never justifies killing anything:
:func:`is_our_backend` checks that the pid still runs *our* command (its command line and start
time on Linux; elsewhere, that the record's port answers as this backend) right before any signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ..backend import atomic


@dataclass(frozen=True)
class Record:
    pid: int
    port: int
    started_at: float
    command: tuple[str, ...]
    proc_start: str = ""  # Linux: the start time in /proc/<pid>/stat, which a reused pid does not share
    owner_pid: int = 0  # the Blender that started it: while that one runs, the backend is not an orphan
    owner_start: str = ""
    token: str = ""  # the access token the backend was started with (the file is readable by its owner only)
    instance_id: str = ""  # what the backend reports in /v1/version: tells it from another program on the port


def record_file(folder: Path, port: int) -> Path:
    """One record per port, so two Blender sessions on different ports never overwrite each other's."""
    return Path(folder) / f"backend-{int(port)}.json"


def record_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("backend-*.json"))


def owner_runs_elsewhere(record: Record) -> bool:
    """The Blender that started the backend still runs (and is not this one): it is that session's."""
    if not record.owner_pid or record.owner_pid == os.getpid() or not pid_alive(record.owner_pid):
        return False
    return not record.owner_start or process_start_token(record.owner_pid) in ("", record.owner_start)


def process_start_token(pid: int) -> str:
    """The kernel's start time of ``pid`` (Linux), or "" where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def write(path: Path, record: Record) -> None:
    """Write atomically (a temporary file, then rename), so a crash never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps({**asdict(record), "command": list(record.command)}, indent=1))


def read(path: Path) -> Record | None:
    """The record, or None when there is none or it is unreadable (an unreadable one is removed)."""
    try:
        data = json.loads(path.read_text())
        return Record(int(data["pid"]), int(data["port"]), float(data["started_at"]),
                      tuple(str(a) for a in data["command"]), str(data.get("proc_start", "")),
                      int(data.get("owner_pid", 0)), str(data.get("owner_start", "")),
                      str(data.get("token", "")), str(data.get("instance_id", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        remove(path)
        return None


def remove(path: Path, pid: int | None = None) -> None:
    """Delete the record; with ``pid``, only if it is still about that process."""
    if pid is not None:
        current = read(path)
        if current is None or current.pid != pid:
            return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which has exited but is not yet reaped, does not count)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and never ours
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) succeeded


def _windows_pid_alive(pid: int) -> bool:
    # os.kill(pid, 0) would terminate the process on Windows; ask the kernel instead.
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _command_line(pid: int, attempts: int = 20) -> list[str] | None:
    """The process's arguments from /proc (Linux); None where there is no /proc.

    A process that is just starting (between fork and exec) shows an empty command line for a
    moment, so an empty one is read again briefly before it counts."""
    for _ in range(attempts):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if raw:
            break
        time.sleep(0.01)
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _answers_as_backend(record: Record, timeout: float = 1.0) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{record.port}/v1/version")
    if record.token:
        request.add_header("Authorization", f"Bearer {record.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            info = json.loads(response.read())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or "api_version" not in info or "backend_version" not in info:
        return False
    return not record.instance_id or info.get("instance_id") == record.instance_id


def is_our_backend(record: Record) -> bool:
    """The record's pid is alive and is the backend it describes, not a process that reused the pid."""
    if not pid_alive(record.pid):
        return False
    cmdline = _command_line(record.pid)
    if cmdline is not None:  # Linux: the command line and the start time tell for sure
        if record.proc_start and process_start_token(record.pid) != record.proc_start:
            return False
        # argv[0] may differ (a Python started through a launcher or a shebang); the rest must not.
        args = list(record.command[1:])
        return len(args) > 0 and cmdline[len(cmdline) - len(args):] == args
    return _answers_as_backend(record)


def terminate(record: Record, timeout: float = 10.0) -> bool:
    """Stop the recorded process (terminate, then kill) after checking it is ours; returns whether it was."""
    if not is_our_backend(record):
        return False
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(record.pid), "/T"], capture_output=True)
    else:
        os.kill(record.pid, signal.SIGTERM)
    if _wait_dead(record.pid, timeout):
        return True
    if not is_our_backend(record):
        return True
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(record.pid), "/T", "/F"], capture_output=True)
    else:
        os.kill(record.pid, signal.SIGKILL)
    _wait_dead(record.pid, timeout)
    return True


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
