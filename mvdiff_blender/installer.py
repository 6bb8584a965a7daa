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
import sys
from dataclasses import dataclass
from pathlib import Path

import bpy

from .child_run import ChildRun, Slot, spawn

INSTALLER = Path(__file__).resolve().with_name("install_backend.py")


@dataclass
class Install(ChildRun):
    """One run of the installer; ``python`` is the environment's interpreter once it said ``DONE``."""

    python: str = ""
    what: str = "The installer"

    def handle(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "DONE" and self.state == "running":
            self.state, self.python, self.fraction = "done", rest.strip(), 1.0
            self.message = f"Installed: {self.python}"
        else:
            super().handle(line)

    def finished(self) -> None:
        from . import preferences

        prefs = preferences.get()
        if prefs is not None:
            prefs.python = self.python


_slot = Slot()
poll = _slot.poll
running = _slot.running


def current() -> Install | None:
    return _slot.run


def start(arguments: tuple[str, ...] = (), script: Path | None = None, log: Path | None = None) -> Install:
    """Start the installer and the timer that follows it (one at a time)."""
    if running():
        raise RuntimeError("The backend installer is already running")
    script = script or INSTALLER
    if log is None:
        from . import preferences

        log = preferences.user_folder("logs") / "install.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    process = spawn([sys.executable, "-u", str(script), *arguments], env, log)
    return _slot.start(Install(process, log, message="Starting the installer"))


def cancel() -> None:
    """End the installer and the pip it runs; what it installed stays for a re-run."""
    _slot.cancel("Installation cancelled")


def draw(layout: bpy.types.UILayout) -> None:
    """The button, or the running installer's progress with Cancel; then how the last run ended."""
    install = _slot.run
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
    _slot.unregister("Installation cancelled")
