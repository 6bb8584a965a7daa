"""Operators: texture the selection, make a World, place cameras, cancel.

A job operator prepares the job on the main thread (poses, depth, export), hands it to a
:class:`~.session.JobSession` and then either polls it from a timer (modal, in the UI: progress
in the status bar and the panel, Esc cancels) or waits for it (background mode, where modal
operators get no events: progress goes to stdout). Results are applied on the main thread in
one call, so with ``UNDO`` the whole apply is one undo step. Any failure ends the operator
with a message and leaves the scene as it was; the job's inputs stay in its folder.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy.app.handlers import persistent

from . import apply, cameras, multiview_weights, preferences
from .connection import SetupError, with_fix
from .job import (
    JobError,
    PreparedJob,
    Steps,
    report_warnings,
    run_steps,
    texture_job_steps,
    textured_objects,
    world_job_steps,
)
from .session import JobSession, Snapshot

TIMER_SECONDS = 0.2
PREVIEW_IMAGE = "MVDiffusion Preview"
CONFIRM_CANCEL_AFTER = 20.0
"""Seconds a job has run on the backend after which cancelling it asks first (the work would be lost)."""


@dataclass
class RunningJob:
    """The one job in flight (the backend runs one at a time; so does the add-on), from preparation on."""

    kind: str
    session: JobSession | None = None
    cancelled: bool = False
    sent_at: float | None = None  # time.monotonic() when the session started
    notes: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True
        if self.session is not None:
            self.session.cancel()

    def needs_confirmation(self, now: float | None = None) -> bool:
        """A job that has been on the backend for a while asks before it is cancelled."""
        if self.sent_at is None or self.cancelled:
            return False
        return (time.monotonic() if now is None else now) - self.sent_at >= CONFIRM_CANCEL_AFTER


_active: RunningJob | None = None


def active_job() -> RunningJob | None:
    return _active


def active_session() -> JobSession | None:
    return _active.session if _active is not None else None


def reset_job_state(window_manager=None, message: str = "") -> None:
    """Forget the job in flight (cancelling it on the backend) and clear the Job panel."""
    global _active
    if _active is not None:
        _active.cancel()
    _active = None
    wm = window_manager if window_manager is not None else getattr(bpy.context, "window_manager", None)
    state = getattr(wm, "mvdiff", None) if wm is not None else None
    if state is not None:
        state.running, state.stage, state.progress = False, "", 0.0
        state.message = message


CANCELLED_BY_LOAD = "The job was cancelled because another file was opened"
_cancelled_by_load = False


@persistent
def _on_load_pre(*_args) -> None:
    """File > Open / New: the job belongs to the scene being closed; cancel it rather than wedge the add-on."""
    global _cancelled_by_load
    _cancelled_by_load = _active is not None
    if _active is not None:
        reset_job_state(message=CANCELLED_BY_LOAD)


@persistent
def _on_load_post(*_args) -> None:
    """The Job panel of the new file says what happened to the job (loading may reset its state)."""
    global _cancelled_by_load
    wm = getattr(bpy.context, "window_manager", None)
    if wm is not None and getattr(wm, "mvdiff", None) is not None and (_cancelled_by_load or wm.mvdiff.running):
        reset_job_state(wm, CANCELLED_BY_LOAD)
    _cancelled_by_load = False


def register_extra() -> None:
    bpy.app.handlers.load_pre.append(_on_load_pre)
    bpy.app.handlers.load_post.append(_on_load_post)


def unregister_extra() -> None:
    for handlers, function in ((bpy.app.handlers.load_pre, _on_load_pre),
                               (bpy.app.handlers.load_post, _on_load_post)):
        if function in handlers:
            handlers.remove(function)
    reset_job_state()


def _redraw(context) -> None:
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


class _JobOperator:
    """What the texture and the World operators share: prepare, run, follow, apply.

    In the UI (``invoke``, and ``execute`` when Repeat Last calls it) the job is modal: the
    preparation advances one step per timer tick (one depth render), then the session is polled;
    Esc cancels (asking first once the job has run on the backend for a while). Without a window
    (``blender -b``, scripts) ``execute`` runs the same steps blocking.
    """

    kind_label = "job"
    task = "depth"  # the backend task whose multi-view weights the job runs with
    _job: RunningJob | None = None
    _steps: Steps | None = None
    _session: JobSession | None = None
    _prepared: PreparedJob | None = None
    _timer = None
    _preview_serial = 0
    _last_line = ""

    # ---------------------------------------------------------------- to override
    def preparation(self, context) -> Steps:
        raise NotImplementedError

    def apply_result(self, context, prepared: PreparedJob, result_dir: Path) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- entry points
    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self._execute_blocking(context)
        if not self._begin(context):
            return {"CANCELLED"}
        self._steps = self.preparation(context)
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_SECONDS, window=context.window)
        wm.modal_handler_add(self)
        wm.progress_begin(0, 100)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        """Repeat Last in the UI starts the modal path; without a window the job runs blocking."""
        if not bpy.app.background and context.window is not None:
            return self.invoke(context, None)
        return self._execute_blocking(context)

    def _execute_blocking(self, context):
        """For ``blender -b`` scripts and anything that calls the operator without a window."""
        if not self._begin(context):
            return {"CANCELLED"}
        try:
            prepared = run_steps(self.preparation(context), lambda *step: self._progress(context, *step))
        except BaseException as err:
            return self._prepare_failed(context, err)
        if not self._send(context, prepared):
            return {"CANCELLED"}
        try:
            snap = self._session.wait(lambda s: self._update(context, s))
        except KeyboardInterrupt:
            self._session.cancel()
            snap = self._session.wait(lambda s: self._update(context, s))
        return self._finish(context, snap)

    def modal(self, context, event):
        job = self._job
        if event.type == "ESC" and event.value == "PRESS":
            if job.needs_confirmation():
                bpy.ops.mvdiff.cancel("INVOKE_DEFAULT")
            else:
                job.cancel()
                context.window_manager.mvdiff.message = "Cancelling..."
            return {"RUNNING_MODAL"}
        if self._steps is not None:
            if event.type != "TIMER" or event.timer is not self._timer:
                return {"RUNNING_MODAL"}  # no edits while depth renders: the scene must not change under them
            return self._step(context)
        if event.type != "TIMER" or event.timer is not self._timer:
            return {"PASS_THROUGH"}
        finished = self._session.finished
        snap = self._session.snapshot
        self._update(context, snap)
        if finished:
            self._end_modal(context)
            return self._finish(context, snap)
        return {"PASS_THROUGH"}

    def cancel(self, context):
        """Blender ends the modal operator (a file is opened, the window closes): stop everything."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self._end_modal(context)
        if _active is self._job:
            reset_job_state(context.window_manager, "Cancelled")

    # ---------------------------------------------------------------- steps
    def _begin(self, context) -> bool:
        global _active
        state = context.window_manager.mvdiff
        try:
            preferences.connection(context)
        except SetupError as err:
            state.running, state.message = False, with_fix(err)
            self.report({"ERROR"}, with_fix(err))
            return False
        self._job = _active = RunningJob(self.kind_label)
        state.running, state.kind, state.message, state.progress = True, self.kind_label, "Preparing", 0.0
        state.job_id, state.stage = "", "prepare"
        return True

    def _step(self, context):
        """One step of the preparation (one depth render) per timer tick."""
        if self._job.cancelled:
            self._steps.close()
            self._steps = None
            self._end_modal(context)
            return self._prepare_failed(context, KeyboardInterrupt())
        try:
            stage, done, total = next(self._steps)
        except StopIteration as end:
            self._steps = None
            if not self._send(context, end.value):
                self._end_modal(context)
                return {"CANCELLED"}
            return {"RUNNING_MODAL"}
        except BaseException as err:
            self._steps = None
            self._end_modal(context)
            return self._prepare_failed(context, err)
        self._progress(context, stage, done, total)
        if context.window is not None:
            context.window_manager.progress_update(int(100 * done / max(total, 1)))
            context.workspace.status_text_set(f"MVDiffusion {self.kind_label}: {stage} {done}/{total} (Esc cancels)")
        return {"RUNNING_MODAL"}

    def _prepare_failed(self, context, err: BaseException):
        """Every way the preparation can end early resets the Job panel; unexpected errors are named."""
        if isinstance(err, KeyboardInterrupt):
            text, level = "Cancelled", {"WARNING"}
        elif isinstance(err, (JobError, SetupError, cameras.CameraError)):
            text, level = with_fix(err), {"ERROR"}
        elif isinstance(err, Exception):
            text, level = f"Preparing the job failed: {type(err).__name__}: {err}", {"ERROR"}
        else:
            raise err
        reset_job_state(context.window_manager, text)
        self.report(level, text)
        return {"CANCELLED"}

    def _send(self, context, prepared: PreparedJob) -> bool:
        state = context.window_manager.mvdiff
        try:
            connection = preferences.connection(context)
        except SetupError as err:
            reset_job_state(context.window_manager, with_fix(err))
            self.report({"ERROR"}, with_fix(err))
            return False
        self._prepared = prepared
        state.job_folder = str(prepared.folder)
        self._session = JobSession(connection, prepared.data, prepared.folder).start()
        self._job.session, self._job.sent_at = self._session, time.monotonic()
        self._log(f"{self.kind_label} job prepared in {prepared.folder}")
        for warning in prepared.warnings:
            self.report({"WARNING"}, warning)
        return True

    def _end_modal(self, context) -> None:
        if self._timer is not None:
            wm = context.window_manager
            wm.event_timer_remove(self._timer)
            self._timer = None
            wm.progress_end()
            if context.workspace is not None:
                context.workspace.status_text_set(None)

    def _progress(self, context, stage: str, step: int, total: int) -> None:
        state = context.window_manager.mvdiff
        state.stage, state.progress = stage, step / total if total else 0.0
        state.message = f"{stage} {step}/{total}"
        self._log(state.message)

    def _update(self, context, snap: Snapshot) -> None:
        state = context.window_manager.mvdiff
        state.job_id, state.stage, state.progress = snap.job_id, snap.stage, snap.fraction
        state.message = snap.error or snap.describe()
        line = state.message
        if line != self._last_line:
            self._last_line = line
            self._log(line)
        if context.window is not None:
            context.window_manager.progress_update(int(100 * snap.fraction))
            context.workspace.status_text_set(f"MVDiffusion {self.kind_label}: {line} (Esc cancels)")
        if snap.preview_path is not None and snap.preview_serial != self._preview_serial:
            self._preview_serial = snap.preview_serial
            _show_preview(state, snap.preview_path)
        _redraw(context)

    def _finish(self, context, snap: Snapshot):
        global _active
        if _active is self._job:
            _active = None
        state = context.window_manager.mvdiff
        state.running = False
        prepared = self._prepared
        if snap.state != "done" or snap.result_dir is None:
            cameras.remove_cameras(context.scene, prepared.placed_cameras or [])
            text = {"cancelled": "Cancelled"}.get(snap.state) or snap.error or snap.state
            state.message = text
            self.report({"WARNING"} if snap.state == "cancelled" else {"ERROR"},
                        f"{self.kind_label.capitalize()} job {snap.state}: {text}. Its inputs are in {prepared.folder}")
            return {"CANCELLED"}
        try:
            summary = self.apply_result(context, prepared, snap.result_dir)
        except apply.ApplyError as err:
            cameras.remove_cameras(context.scene, prepared.placed_cameras or [])
            state.message = str(err)
            self.report({"ERROR"}, f"Could not apply the result: {err}. The files are in {snap.result_dir}; "
                                   "Apply Result applies them once the problem is fixed")
            return {"CANCELLED"}
        state.message, state.progress = summary, 1.0
        independent = multiview_weights.remember_report(self.task, snap.result_dir / "report.json")
        if independent:
            state.message = f"{summary}. {independent}"
            self.report({"WARNING"}, f"{summary}. {independent}: press Download Multi-View Weights in the "
                                     "MVDiffusion Backend panel")
        else:
            self.report({"INFO"}, summary)
        warnings = report_warnings(snap.result_dir / "report.json")
        for warning in warnings:
            self.report({"WARNING"}, f"{self.kind_label.capitalize()} job: {warning}")
        if warnings:
            state.message = f"{state.message}. Warning: {'; '.join(warnings)}"
        return {"FINISHED"}

    def _log(self, line: str) -> None:
        if bpy.app.background:
            print(f"[mvdiff] {line}", file=sys.stdout, flush=True)


def _show_preview(state, path: Path) -> None:
    """Load the latest preview into one reused image datablock (the panel shows its icon)."""
    image = bpy.data.images.get(state.preview_image) if state.preview_image else None
    try:
        if image is None:
            image = bpy.data.images.load(str(path), check_existing=False)
            image.name = PREVIEW_IMAGE
            state.preview_image = image.name
        else:
            image.filepath = str(path)
            image.reload()
        image.preview_ensure()
        image.preview.reload()
    except RuntimeError:  # a preview written while we read it; the next one will do
        pass


class MVDIFF_OT_texture(_JobOperator, bpy.types.Operator):
    bl_idname = "mvdiff.texture"
    bl_label = "Texture Selected"
    bl_description = "Render depth for every camera, generate all views jointly and bake them into a texture"
    bl_options = {"REGISTER", "UNDO"}
    kind_label = "texture"

    @classmethod
    def poll(cls, context):
        return _can_run(cls, context, needs_meshes=True, prompt=context.scene.mvdiff.prompt
                        or context.scene.mvdiff.prompts_text)

    def preparation(self, context) -> Steps:
        return texture_job_steps(context)

    def apply_result(self, context, prepared, result_dir) -> str:
        return apply_texture_result(self, context, prepared, result_dir)


class MVDIFF_OT_make_world(_JobOperator, bpy.types.Operator):
    bl_idname = "mvdiff.make_world"
    bl_label = "Make 360 World"
    bl_description = "Generate a 360 panorama, lift it to HDR and use it as the World background"
    bl_options = {"REGISTER", "UNDO"}
    kind_label = "world"
    task = "panorama"

    @classmethod
    def poll(cls, context):
        return _can_run(cls, context, needs_meshes=False, prompt=context.scene.mvdiff.world_prompt)

    def preparation(self, context) -> Steps:
        return world_job_steps(context)

    def apply_result(self, context, prepared, result_dir) -> str:
        return apply_world_result(context, prepared, result_dir)


def apply_texture_result(operator, context, prepared: PreparedJob, result_dir: Path) -> str:
    """A texture job's downloaded result onto the objects it was made for (after the job, or again later)."""
    objects = [bpy.data.objects[name] for name in prepared.objects if name in bpy.data.objects]
    if len(objects) != len(prepared.objects):
        missing = sorted(set(prepared.objects) - {o.name for o in objects})
        raise apply.ApplyError(f"objects missing from the scene: {', '.join(missing)}")
    applied = apply.apply_texture(objects, result_dir, object_names=prepared.objects,
                                  output_dir=prepared.output_dir, basename=prepared.basename,
                                  uv_map=prepared.uv_map, make_active=prepared.make_uv_active,
                                  make_single_user=prepared.make_single_user)
    context.window_manager.mvdiff.result_path = str(applied.path)
    split = {o.name: n for o, n in zip(objects, applied.split_triangles, strict=True) if n}
    if split:
        where = ", ".join(f"{name} ({n})" for name, n in split.items())
        operator.report({"WARNING"}, f"The unwrap cut through quads or n-gons; triangles with a distorted texture: "
                                     f"{where}. Triangulate those meshes before texturing to avoid it")
    return f"Textured {len(objects)} object(s): {applied.path}"


def apply_world_result(context, prepared: PreparedJob, result_dir: Path) -> str:
    settings = context.scene.mvdiff
    world = apply.apply_world(context.scene, result_dir / "panorama.exr", output_dir=prepared.output_dir,
                              basename=prepared.basename, use_current=settings.world_replace_current,
                              strength=settings.world_strength)
    image = next((n.image for n in world.node_tree.nodes if n.type == "TEX_ENVIRONMENT" and n.image), None)
    path = bpy.path.abspath(image.filepath) if image else ""
    context.window_manager.mvdiff.result_path = path
    return f"World {world.name!r} set from {path or prepared.basename}"


def _can_run(cls, context, *, needs_meshes: bool, prompt) -> bool:
    if _active is not None:
        cls.poll_message_set("A job is already running; cancel it or wait for it")
        return False
    if needs_meshes and not textured_objects(context):
        cls.poll_message_set("Select one or more mesh objects to texture")
        return False
    if not prompt:
        cls.poll_message_set("Write a prompt first")
        return False
    return True


class MVDIFF_OT_cancel(bpy.types.Operator):
    bl_idname = "mvdiff.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the running job (asks first when it has run on the backend for a while)"

    @classmethod
    def poll(cls, context):
        if _active is None:
            cls.poll_message_set("No job is running")
            return False
        return True

    def invoke(self, context, event):
        if _active is not None and _active.needs_confirmation():
            return context.window_manager.invoke_confirm(
                self, event, title="Cancel the running job?",
                message="The backend's work on it so far is lost", confirm_text="Cancel Job")
        return self.execute(context)

    def execute(self, context):
        if _active is not None:
            _active.cancel()
        context.window_manager.mvdiff.message = "Cancelling..."
        return {"FINISHED"}


class MVDIFF_OT_place_cameras(bpy.types.Operator):
    bl_idname = "mvdiff.place_cameras"
    bl_label = "Place Cameras"
    bl_description = "Place the orbit or walk cameras now, in their own collection, to inspect or edit them"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        settings = context.scene.mvdiff
        if settings.camera_source not in ("ORBIT", "WALK"):
            cls.poll_message_set("Only the Orbit and Walk camera sources place cameras")
            return False
        if settings.camera_source == "ORBIT" and not textured_objects(context):
            cls.poll_message_set("Select the mesh objects to orbit around")
            return False
        if settings.camera_source == "WALK" and settings.walk_curve is None:
            cls.poll_message_set("Choose the curve to walk along")
            return False
        return True

    def execute(self, context):
        settings = context.scene.mvdiff
        try:
            placed = cameras.place_for_settings(context, settings, textured_objects(context))
        except cameras.CameraError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Placed {len(placed)} cameras in the collection {cameras.COLLECTION_NAME!r}")
        return {"FINISHED"}


classes = (MVDIFF_OT_texture, MVDIFF_OT_make_world, MVDIFF_OT_cancel, MVDIFF_OT_place_cameras)
