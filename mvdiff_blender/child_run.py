"""Long work in a child process, followed from Blender's main thread without blocking it.

Installing the backend and downloading models take minutes. The child prints protocol lines on
stdout (``PROGRESS <fraction> <message>``, and whatever ends the run: ``DONE ...``, ``ERROR ...``
or a JSON object); a reader thread queues every line and copies it to a log, and a
``bpy.app.timers`` function calls :meth:`ChildRun.poll` on the main thread, the only thread
allowed to write bpy data, which hands each line to the run's ``handle`` and shows progress.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bpy

POLL_SECONDS = 0.25
_END = None  # queued by the reader thread when the child's output ends


@dataclass
class ChildRun:
    """One child process: its queued lines and what it said so far.

    ``state`` is running, done, failed or cancelled. Subclasses read their own end lines in
    :meth:`handle` and act on success in :meth:`finished` (on the main thread).
    """

    process: subprocess.Popen
    log: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    state: str = "running"
    fraction: float = 0.0
    message: str = "Starting"
    progress_shown: bool = False
    ended: bool = False  # the child's output has ended and :meth:`finished` has run

    what: str = "The child process"

    def handle(self, line: str) -> None:
        """One line of the protocol; lines it does not know are for the log only."""
        word, _, rest = line.partition(" ")
        if word == "PROGRESS":
            fraction, _, message = rest.partition(" ")
            try:
                self.fraction = float(fraction)
            except ValueError:
                return
            self.message = message
        elif word == "ERROR" and self.state == "running":
            self.state, self.message = "failed", rest.strip()

    def finished(self) -> None:
        """Called once on the main thread after the child ended with ``state == "done"``."""

    def poll(self) -> bool:
        """Take the queued lines; returns whether to poll again: until the child's output has ended,
        even after its last protocol line, so that :meth:`finished` runs once the child is gone."""
        if self.ended:
            return False
        ended = False
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is _END:
                ended = True
                break
            self.handle(line)
        if ended:
            code = self.process.wait()
            if self.state == "running":
                self.state = "failed"
                self.message = f"{self.what} stopped (exit {code}) without finishing; its log is {self.log}"
            if self.state == "done":
                self.finished()
            self.ended = True
        _show_progress(self)
        _redraw_preferences()
        return not self.ended

    def cancel(self, message: str = "Cancelled") -> None:
        """End the child and everything it started (its whole process group)."""
        if self.state != "running":
            return
        self.state, self.message = "cancelled", message
        if self.process.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True)
                else:
                    os.killpg(self.process.pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                self.process.kill()


class Slot:
    """At most one run of one kind (the installer, a weights download) and the timer that follows it."""

    def __init__(self):
        self.run: ChildRun | None = None
        self.poll = self._poll  # one bound method for good: bpy.app.timers knows a timer by identity

    def running(self) -> bool:
        return self.run is not None and self.run.state == "running"

    def start(self, run: ChildRun) -> ChildRun:
        self.run = run
        follow(run, self.poll)
        return run

    def _poll(self) -> float | None:
        """The timer: None (stop) once the run has ended."""
        return POLL_SECONDS if self.run is not None and self.run.poll() else None

    def cancel(self, message: str) -> None:
        if self.run is not None:
            self.run.cancel(message)

    def unregister(self, message: str) -> None:
        """A run still going ends with the add-on, and so does its timer."""
        self.cancel(message)
        if bpy.app.timers.is_registered(self.poll):
            bpy.app.timers.unregister(self.poll)


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``command`` in its own process group with stdout (and stderr) piped as text lines."""
    kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, env=env, **kwargs)


def follow(run: ChildRun, timer) -> None:
    """Start the reader thread for ``run`` and the timer function that polls it."""
    threading.Thread(target=_read, args=(run,), name="mvdiff-child-reader", daemon=True).start()
    if not bpy.app.timers.is_registered(timer):
        bpy.app.timers.register(timer, first_interval=POLL_SECONDS)


def _read(run: ChildRun) -> None:
    """Reader thread: the child's lines into the queue, and into the log for people."""
    with open(run.log, "w", encoding="utf-8") as log:
        for line in run.process.stdout:
            log.write(line)
            log.flush()
            run.lines.put(line.rstrip("\n"))
    run.lines.put(_END)


def _show_progress(run: ChildRun) -> None:
    """The window manager's progress (the cursor and status bar) while the child runs."""
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    if run.state == "running":
        if not run.progress_shown:
            wm.progress_begin(0.0, 1.0)
            run.progress_shown = True
        wm.progress_update(run.fraction)
    elif run.progress_shown:
        wm.progress_end()
        run.progress_shown = False


def _redraw_preferences() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    for window in wm.windows if wm else ():
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):
                area.tag_redraw()
