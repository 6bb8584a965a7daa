"""The *Install Backend* button: makes the backend's environment without leaving Blender.

It runs ``install_backend.py`` (next to this module; standard library only) in a child process
with Blender's own Python, ``sys.executable``. The child can take many minutes (pip downloads
torch), so Blender must not wait for it: a thread reads the child's lines into a queue, and a
``bpy.app.timers`` function on Blender's main thread takes them, updates what the preferences
draw and the window manager's progress, and on ``DONE <python>`` fills in *Backend Python*
(bpy data may only be written from the main thread). Cancel ends the child with its pip.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bpy

INSTALLER = Path(__file__).resolve().with_name("install_backend.py")
POLL_SECONDS = 0.25
_END = None  # queued by the reader thread when the child's output ends


@dataclass
class Install:
    """One run of the installer: the child process, its queued lines and what it said so far."""

    process: subprocess.Popen
    log: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    state: str = "running"  # running, done, failed, cancelled
    fraction: float = 0.0
    message: str = "Starting the installer"
    python: str = ""
    progress_shown: bool = False


_current: Install | None = None


def current() -> Install | None:
    return _current


def running() -> bool:
    return _current is not None and _current.state == "running"


def start(arguments: tuple[str, ...] = (), script: Path | None = None, log: Path | None = None) -> Install:
    """Start the installer and the timer that follows it (one at a time)."""
    global _current
    if running():
        raise RuntimeError("The backend installer is already running")
    script = script or INSTALLER
    if log is None:
        from . import preferences

        log = preferences.user_folder("logs") / "install.log"
    kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    process = subprocess.Popen([sys.executable, "-u", str(script), *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                               env=env, **kwargs)
    _current = Install(process, log)
    threading.Thread(target=_read, args=(_current,), name="mvdiff-install-reader", daemon=True).start()
    if not bpy.app.timers.is_registered(poll):
        bpy.app.timers.register(poll, first_interval=POLL_SECONDS)
    return _current


def _read(install: Install) -> None:
    """Reader thread: the child's lines into the queue, and into the log for people."""
    with open(install.log, "w", encoding="utf-8") as log:
        for line in install.process.stdout:
            log.write(line)
            log.flush()
            install.lines.put(line.rstrip("\n"))
    install.lines.put(_END)


def handle(install: Install, line: str) -> None:
    """One line of the installer's protocol (other lines are for the log only)."""
    word, _, rest = line.partition(" ")
    if word == "PROGRESS":
        fraction, _, message = rest.partition(" ")
        try:
            install.fraction = float(fraction)
        except ValueError:
            return
        install.message = message
    elif word == "DONE" and install.state == "running":
        install.state, install.python, install.fraction = "done", rest.strip(), 1.0
        install.message = f"Installed: {install.python}"
    elif word == "ERROR" and install.state == "running":
        install.state, install.message = "failed", rest.strip()


def poll() -> float | None:
    """The timer: takes the queued lines on the main thread; returns None (stop) once the child has ended."""
    install = _current
    if install is None:
        return None
    ended = False
    while True:
        try:
            line = install.lines.get_nowait()
        except queue.Empty:
            break
        if line is _END:
            ended = True
            break
        handle(install, line)
    if ended:
        code = install.process.wait()
        if install.state == "running":
            install.state = "failed"
            install.message = f"The installer stopped (exit {code}) without finishing; its log is {install.log}"
        if install.state == "done":
            _set_backend_python(install.python)
    _show_progress(install)
    _redraw_preferences()
    if install.state != "running":
        return None
    return POLL_SECONDS


def cancel() -> None:
    """End the installer and the pip it runs (its whole process group); what it installed stays for a re-run."""
    install = _current
    if install is None or install.state != "running":
        return
    install.state, install.message = "cancelled", "Installation cancelled"
    process = install.process
    if process.poll() is None:
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True)
            else:
                os.killpg(process.pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            process.kill()


def _set_backend_python(python: str) -> None:
    from . import preferences

    prefs = preferences.get()
    if prefs is not None:
        prefs.python = python


def _show_progress(install: Install) -> None:
    """The window manager's progress (the cursor and status bar) while the installer runs."""
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    if install.state == "running":
        if not install.progress_shown:
            wm.progress_begin(0.0, 1.0)
            install.progress_shown = True
        wm.progress_update(install.fraction)
    elif install.progress_shown:
        wm.progress_end()
        install.progress_shown = False


def _redraw_preferences() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    for window in wm.windows if wm else ():
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def draw(layout: bpy.types.UILayout) -> None:
    """The button, or the running installer's progress with Cancel; then how the last run ended."""
    install = _current
    row = layout.row()
    if install is not None and install.state == "running":
        row.label(text=f"{install.fraction:.0%} {install.message}", icon="SORTTIME")
        row.operator("mvdiff.backend_install_cancel", text="", icon="CANCEL")
        return
    row.operator("mvdiff.backend_install", icon="IMPORT")
    if install is not None:
        icon = {"done": "CHECKMARK", "failed": "ERROR"}.get(install.state, "INFO")
        layout.label(text=install.message, icon=icon)


class MVDIFF_OT_backend_install(bpy.types.Operator):
    bl_idname = "mvdiff.backend_install"
    bl_label = "Install Backend"
    bl_description = ("Make a Python environment with the backend's packages and the torch build for this machine "
                      "(downloads several GB), and set Backend Python to it")

    @classmethod
    def poll(cls, context):
        if running():
            cls.poll_message_set("The installer is already running")
            return False
        return True

    def execute(self, context):
        try:
            install = start()
        except (OSError, RuntimeError) as err:
            self.report({"ERROR"}, f"Could not start the installer: {err}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Installing the backend; its log is {install.log}")
        return {"FINISHED"}


class MVDIFF_OT_backend_install_cancel(bpy.types.Operator):
    bl_idname = "mvdiff.backend_install_cancel"
    bl_label = "Cancel Install"
    bl_description = "Stop installing the backend (a later install continues from what is there)"

    def execute(self, context):
        cancel()
        return {"FINISHED"}


classes = (MVDIFF_OT_backend_install, MVDIFF_OT_backend_install_cancel)


def unregister_extra() -> None:
    """An installer still running ends with the add-on."""
    cancel()
    if bpy.app.timers.is_registered(poll):
        bpy.app.timers.unregister(poll)
