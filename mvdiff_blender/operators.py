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
from pathlib import Path

import bpy

from . import apply, cameras, multiview_weights, preferences
from .connection import SetupError, with_fix
from .job import JobError, PreparedJob, prepare_texture_job, prepare_world_job, textured_objects
from .session import JobSession, Snapshot

TIMER_SECONDS = 0.2
PREVIEW_IMAGE = "MVDiffusion Preview"

# The one job in flight (the backend runs one at a time; so does the add-on).
_active: JobSession | None = None


def active_session() -> JobSession | None:
    return _active


def _redraw(context) -> None:
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


class _JobOperator:
    """What the texture and the World operators share: prepare, run, follow, apply."""

    kind_label = "job"
    task = "depth"  # the backend task whose multi-view weights the job runs with
    _session: JobSession | None = None
    _prepared: PreparedJob | None = None
    _timer = None
    _preview_serial = 0
    _last_line = ""

    # ---------------------------------------------------------------- to override
    def prepare(self, context) -> PreparedJob:
        raise NotImplementedError

    def apply_result(self, context, prepared: PreparedJob, result_dir: Path) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- entry points
    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self.execute(context)
        if not self._start(context):
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_SECONDS, window=context.window)
        wm.modal_handler_add(self)
        wm.progress_begin(0, 100)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        """Blocking: for ``blender -b`` scripts and anything that calls the operator without a window."""
        if not self._start(context):
            return {"CANCELLED"}
        try:
            snap = self._session.wait(lambda s: self._update(context, s))
        except KeyboardInterrupt:
            self._session.cancel()
            snap = self._session.wait(lambda s: self._update(context, s))
        return self._finish(context, snap)

    def modal(self, context, event):
        session = self._session
        if event.type == "ESC" and event.value == "PRESS":
            session.cancel()
            context.window_manager.mvdiff.message = "Cancelling..."
            return {"RUNNING_MODAL"}
        if event.type != "TIMER" or event.timer is not self._timer:
            return {"PASS_THROUGH"}
        finished = session.finished
        snap = session.snapshot
        self._update(context, snap)
        if finished:
            wm = context.window_manager
            wm.event_timer_remove(self._timer)
            wm.progress_end()
            context.workspace.status_text_set(None)
            return self._finish(context, snap)
        return {"PASS_THROUGH"}

    # ---------------------------------------------------------------- steps
    def _start(self, context) -> bool:
        global _active
        state = context.window_manager.mvdiff
        try:
            connection = preferences.connection(context)
            state.running, state.kind, state.message, state.progress = True, self.kind_label, "Preparing", 0.0
            state.job_id, state.stage = "", "prepare"
            prepared = self.prepare(context)
        except (JobError, SetupError, cameras.CameraError) as err:
            state.running, state.message = False, with_fix(err)
            self.report({"ERROR"}, with_fix(err))
            return False
        self._prepared = prepared
        self._session = JobSession(connection, prepared.data, prepared.folder).start()
        _active = self._session
        self._log(f"{self.kind_label} job prepared in {prepared.folder}")
        return True

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
            state.message = str(err)
            self.report({"ERROR"}, f"Could not apply the result: {err}. The files are in {snap.result_dir}")
            return {"CANCELLED"}
        state.message, state.progress = summary, 1.0
        independent = multiview_weights.remember_report(self.task, snap.result_dir / "report.json")
        if independent:
            state.message = f"{summary}. {independent}"
            self.report({"WARNING"}, f"{summary}. {independent}: press Download Multi-View Weights in the "
                                     "MVDiffusion Backend panel")
        else:
            self.report({"INFO"}, summary)
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

    def prepare(self, context) -> PreparedJob:
        return prepare_texture_job(context, on_progress=lambda stage, i, n: self._progress(context, stage, i, n))

    def apply_result(self, context, prepared, result_dir) -> str:
        objects = [bpy.data.objects[name] for name in prepared.objects if name in bpy.data.objects]
        if len(objects) != len(prepared.objects):
            missing = sorted(set(prepared.objects) - {o.name for o in objects})
            raise apply.ApplyError(f"objects deleted while the job ran: {', '.join(missing)}")
        applied = apply.apply_texture(objects, result_dir, object_names=prepared.objects,
                                      output_dir=prepared.output_dir, basename=prepared.basename,
                                      uv_map=prepared.uv_map)
        context.window_manager.mvdiff.result_path = str(applied.path)
        split = {o.name: n for o, n in zip(objects, applied.split_triangles, strict=True) if n}
        if split:
            where = ", ".join(f"{name} ({n})" for name, n in split.items())
            self.report({"WARNING"}, f"The unwrap cut through quads or n-gons; triangles with a distorted texture: "
                                     f"{where}. Triangulate those meshes before texturing to avoid it")
        return f"Textured {len(objects)} object(s): {applied.path}"


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

    def prepare(self, context) -> PreparedJob:
        return prepare_world_job(context)

    def apply_result(self, context, prepared, result_dir) -> str:
        settings = context.scene.mvdiff
        world = apply.apply_world(context.scene, result_dir / "panorama.exr", output_dir=prepared.output_dir,
                                  basename=prepared.basename, use_current=settings.world_replace_current,
                                  strength=settings.world_strength)
        image = next((n.image for n in world.node_tree.nodes if n.type == "TEX_ENVIRONMENT" and n.image), None)
        context.window_manager.mvdiff.result_path = bpy.path.abspath(image.filepath) if image else ""
        return f"World {world.name!r} set from {prepared.basename}"


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
    bl_description = "Stop the running job on the backend"

    @classmethod
    def poll(cls, context):
        if _active is None:
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context):
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
