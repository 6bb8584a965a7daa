"""Whether the backend's views agree, said where the user looks, with the download that fixes it.

Without MVDiffusion's multi-view weights the backend's CAA blocks stay at identity and every view
is generated alone: a texture as inconsistent as a one-view-at-a-time add-on's. The backend says
so per task (``multiview_weights`` in ``/v1/version`` and in each job's ``report.json``); this
module remembers the last answer, draws the warning in the preferences and the panels, and runs
``python -m backend models download`` with the backend's Python to fetch the released weights
(into the models folder outside the extension, where the backend finds them at its next start).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import bpy

from ..backend.protocol import NO_MULTIVIEW_WEIGHTS
from . import backend_process, compat
from .child_run import ChildRun, Slot, spawn

TASK_CHECKPOINTS = {"depth": "depth_gen", "panorama": "pano"}
"""The released checkpoint each task's multi-view weights come from (the backend's catalog names)."""
TASK_LABELS = {"depth": "Texturing", "panorama": "360 Worlds"}
WARNING = "{label}: no multi-view weights; views are tied together training-free, from the base model alone"

CANCELLED = "Download cancelled; pressing Download again resumes it"

_weights: dict[str, str] = {}  # task -> the backend's last word on its multi-view weights
_base_models: dict[str, str] = {}  # task -> the base model it named


def remember(tasks: dict | None) -> None:
    """Keep what ``/v1/version`` said (``tasks``: task -> {base_model, multiview_weights})."""
    for task, info in (tasks or {}).items():
        if isinstance(info, dict) and isinstance(info.get("multiview_weights"), str):
            _weights[task] = info["multiview_weights"]
            _base_models[task] = str(info.get("base_model") or "")


def remember_report(task: str, report_path: Path) -> str | None:
    """Read a finished job's ``report.json``; returns the warning when its views were generated alone."""
    try:
        weights = json.loads(report_path.read_text("utf-8")).get("multiview_weights")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(weights, str):
        _weights[task] = weights
    return warning(task)


def forget() -> None:
    _weights.clear()
    _base_models.clear()


def summary(task: str) -> str | None:
    """``Texturing: <base model> + <weights file>``, as the backend last said; None before it said."""
    if task not in _weights or task not in TASK_LABELS:
        return None
    weights = "no multi-view weights" if independent(task) else Path(_weights[task]).name
    return f"{TASK_LABELS[task]}: {_base_models.get(task) or '?'} + {weights}"


def independent(task: str) -> bool:
    return _weights.get(task) == NO_MULTIVIEW_WEIGHTS


def warning(task: str) -> str | None:
    return WARNING.format(label=TASK_LABELS[task]) if independent(task) else None


@dataclass
class Download(ChildRun):
    """``models download ... --progress-lines --json``: PROGRESS lines, then one JSON object."""

    what: str = "The download"

    def handle(self, line: str) -> None:
        if line.startswith("{") and self.state == "running":
            try:
                result = json.loads(line)
            except ValueError:
                return
            if result.get("ok"):
                self.state, self.fraction = "done", 1.0
                self.message = "Multi-view weights downloaded; the backend uses them from its next start"
            else:
                self.state, self.message = "failed", f"Download failed: {result.get('error', 'see the log')}"
        else:
            super().handle(line)

    def finished(self) -> None:
        """A backend of ours that is idle restarts on the next job, now with the weights."""
        from . import operators

        if backend_process.is_running() and operators.active_session() is None:
            backend_process.stop()
        forget()


_slot = Slot()
poll = _slot.poll
running = _slot.running


def current() -> Download | None:
    return _slot.run


def start(python: str, extension_root: Path, tasks: list[str], log: Path) -> Download:
    """Download the released weights of ``tasks`` with the backend's Python (one download at a time)."""
    if running():
        raise RuntimeError("A download is already running")
    backend_process.check_python(python)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "HF_HUB_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extension_root), env.get("PYTHONPATH", "")) if p)
    items = [TASK_CHECKPOINTS[task] for task in tasks]
    command = [python, "-u", "-m", "backend", "models", "download", *items, "--progress-lines", "--json"]
    return _slot.start(Download(spawn(command, env, log), log, message="Starting the download"))


def cancel() -> None:
    _slot.cancel(CANCELLED)


def draw(
    layout: bpy.types.UILayout, tasks: tuple[str, ...] = tuple(TASK_CHECKPOINTS), show_result: bool = True
) -> None:
    """The warning for each task of ``tasks`` whose views are independent, and the download (its
    progress while it runs; how it ended, with ``show_result``)."""
    shown = [task for task in tasks if independent(task)]
    if show_result:
        for task in tasks:
            if summary(task) and not independent(task):
                layout.label(text=summary(task), icon="CHECKMARK")
    for task in shown:
        layout.label(text=warning(task), icon="ERROR")
    run = _slot.run
    if run is not None and run.state == "running":
        row = layout.row()
        row.label(text=f"{run.fraction:.0%} {run.message}", icon="SORTTIME")
        row.operator("mvdiff.weights_download_cancel", text="", icon="CANCEL")
    elif shown:
        layout.operator("mvdiff.weights_download", icon="IMPORT")
    if show_result and run is not None and run.state != "running":
        layout.label(text=run.message, icon="CHECKMARK" if run.state == "done" else "INFO")


class MVDIFF_OT_weights_download(bpy.types.Operator):
    bl_idname = "mvdiff.weights_download"
    bl_label = "Download Multi-View Weights"
    bl_description = ("Download MVDiffusion's released multi-view weights (several GB each) into the models folder, "
                      "so that the views of a job are generated together and agree")

    @classmethod
    def poll(cls, context):
        from . import preferences

        prefs = preferences.get(context)
        if prefs is not None and prefs.mode != "LOCAL":
            cls.poll_message_set("The backend runs elsewhere: run 'python -m backend models download depth_gen pano' "
                                 "on that machine")
            return False
        if not compat.online_access_allowed():
            cls.poll_message_set("Allow Online Access in Edit > Preferences > System > Network first")
            return False
        if running():
            cls.poll_message_set("The download is already running")
            return False
        return True

    def execute(self, context):
        from . import preferences

        tasks = [task for task in TASK_CHECKPOINTS if independent(task)] or list(TASK_CHECKPOINTS)
        try:
            launch = preferences.local_launch(context)
            run = start(launch.python, launch.extension_root, tasks, preferences.user_folder("logs") / "download.log")
        except Exception as err:  # noqa: BLE001 - SetupError or OSError: both go to the user as they are
            from .connection import with_fix

            self.report({"ERROR"}, with_fix(err))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Downloading the multi-view weights; the log is {run.log}")
        return {"FINISHED"}


class MVDIFF_OT_weights_download_cancel(bpy.types.Operator):
    bl_idname = "mvdiff.weights_download_cancel"
    bl_label = "Cancel Download"
    bl_description = "Stop the download (what arrived is kept, and the next download resumes it)"

    def execute(self, context):
        cancel()
        return {"FINISHED"}


classes = (MVDIFF_OT_weights_download, MVDIFF_OT_weights_download_cancel)


def unregister_extra() -> None:
    _slot.unregister(CANCELLED)
