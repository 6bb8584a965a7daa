"""Native calls that may crash, hang or hold the GIL, run in a child Python process.

xatlas segfaults on some large meshes and holds the GIL for many seconds per call; in the
server's process either would take every request down with it. A child process
(``python -m <module> in.npz out.npz``) isolates both: the parent keeps answering, polls the
job's cancel check, enforces a time limit, relays the child's progress and turns a crash into a
:class:`ChildFailed` whose message a user can act on. Arrays travel as ``.npz`` files in a
temporary folder, so nothing is pickled either way.

The child side is :func:`child_main`: a module's ``if __name__ == "__main__"`` block hands it the
function to run. An :class:`~backend.validation.InputError` raised there reaches the parent as
the same error (same field), so callers see no difference from an in-process call.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..validation import InputError

log = logging.getLogger("backend.child")
Check = Callable[[], None]  # raises (e.g. Cancelled) to stop the work
Progress = Callable[[int, int], None]  # step, total
Work = Callable[[dict[str, np.ndarray], Progress], dict[str, np.ndarray]]

POLL_SECONDS = 0.05
PROGRESS_PREFIX = "progress "
INPUT_ERROR_EXIT = 3  # the child raised InputError; the details are in the error file
PEAK_MEMORY_KEY = "peak_rss_bytes"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class ChildFailed(RuntimeError):
    """A child process crashed, ran past its time limit or failed unexpectedly; ``str`` says which.

    ``peak_bytes``: the child's peak resident memory where the system reports it, else None.
    """

    def __init__(self, message: str, peak_bytes: int | None = None):
        super().__init__(message)
        self.peak_bytes = peak_bytes


def run_child(
    module: str,
    arrays: dict[str, np.ndarray],
    *,
    what: str,
    time_limit: float,
    check: Check | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Run ``python -m module`` on ``arrays`` and return the arrays it wrote.

    ``what`` names the work in error messages ("unwrapping 82k triangles"). ``check`` is called
    every poll; whatever it raises stops the child (killed) and propagates. The result holds
    :data:`PEAK_MEMORY_KEY`, the child's peak resident memory in bytes (0 where the system does
    not report it).
    """
    with tempfile.TemporaryDirectory(prefix="mvdiff-child-") as folder:
        source, target = Path(folder) / "in.npz", Path(folder) / "out.npz"
        error_file, log_file = target.with_suffix(".error.json"), Path(folder) / "stderr.txt"
        np.savez(source, **arrays)
        path = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, str(source), str(target)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONPATH": path},
            )
            reader = threading.Thread(target=_relay, args=(process.stdout, progress), daemon=True)
            reader.start()
            try:
                code, peak = _wait(process, what, time_limit, check)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                reader.join(5)
        if code == 0:
            with np.load(target, allow_pickle=False) as result:
                arrays = {name: result[name] for name in result.files}
            # The child's own figure is exact; the polls may have missed its last moments.
            arrays[PEAK_MEMORY_KEY] = np.int64(max(int(arrays.get(PEAK_MEMORY_KEY, 0)), peak or 0))
            return arrays
        if code == INPUT_ERROR_EXIT and error_file.exists():
            error = json.loads(error_file.read_text())
            raise InputError(error["field"], error["problem"])
        raise ChildFailed(_crash_message(what, code, log_file.read_text(errors="replace")), peak)


def _wait(process: subprocess.Popen, what: str, time_limit: float, check: Check | None) -> tuple[int, int | None]:
    """The child's exit code and peak memory (bytes, or None where unknown) once it ends.

    Raises what ``check`` raises, or ChildFailed once the time limit passes. The peak is the
    child's own high-water mark (Linux ``VmHWM``) read at every poll, so it is known after a
    crash too; ``ru_maxrss`` would not do, as it counts the parent's memory at the fork.
    """
    deadline = time.monotonic() + time_limit
    peak = None
    while True:
        try:
            return process.wait(POLL_SECONDS), peak
        except subprocess.TimeoutExpired:  # by now the child runs its own program, not a copy of ours
            peak = max(peak or 0, _high_water(process.pid)) or peak
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ChildFailed(f"{what} did not finish within its time limit of {time_limit:.0f} s and was stopped; "
                              "simplify the mesh (e.g. a Decimate modifier) or use its own UV map", peak)


def _high_water(pid: int) -> int:
    """Peak resident memory of a running process in bytes (0 where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _relay(stream, progress: Progress | None) -> None:
    """Pass the child's progress lines on; read to the end whatever happens, so the child never blocks."""
    for raw in stream:
        line = raw.decode("utf-8", "replace").strip()
        if progress is None or not line.startswith(PROGRESS_PREFIX):
            continue
        try:
            step, total = (int(part) for part in line[len(PROGRESS_PREFIX):].split())
            progress(step, total)
        except Exception:  # progress is best effort: a failing status write must not stall the child
            log.exception("could not report the progress line %r", line)
            progress = None


def _crash_message(what: str, code: int, log: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return (f"{what} crashed ({name}); the backend itself kept running. Simplify the mesh (e.g. a "
                "Decimate modifier) or use its own UV map")
    last = next((line for line in reversed(log.strip().splitlines()) if line.strip()), "no message")
    return f"{what} failed (exit code {code}): {last}"


def child_main(work: Work) -> None:
    """The child's side: read ``argv[1]``, run ``work``, write ``argv[2]`` (or the error file)."""
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}

    def report(step: int, total: int) -> None:
        print(f"{PROGRESS_PREFIX}{int(step)} {int(total)}", flush=True)

    try:
        result = work(arrays, report)
    except InputError as err:
        target.with_suffix(".error.json").write_text(json.dumps({"field": err.field, "problem": err.problem}))
        sys.exit(INPUT_ERROR_EXIT)
    result[PEAK_MEMORY_KEY] = np.int64(_high_water(os.getpid()))
    np.savez(target, **result)
