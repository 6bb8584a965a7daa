"""The add-on as a user clicks it: a file opened during a job, a preparation that fails, depth rendered
step by step, cancels that ask first, a result applied again, scene-sized clip ranges, view sizes
that snap, and a tooltip on every setting."""

import types

import numpy as np
import pytest

from backend.pipelines.texturing_outputs import write_npz, write_texture

pytestmark = pytest.mark.blender


@pytest.fixture
def remote(addon):
    """Preferences that make a connection without starting anything (no job reaches it in these tests)."""
    import bpy

    prefs = addon.preferences.get(bpy.context)
    mode, url = prefs.mode, prefs.url
    prefs.mode, prefs.url = "REMOTE", "http://127.0.0.1:9"
    yield prefs
    prefs.mode, prefs.url = mode, url


def _cube(bpy, name="Cube", size=2.0, location=(0.0, 0.0, 0.0)):
    bpy.ops.mesh.primitive_cube_add(size=size, location=location)
    obj = bpy.context.object
    obj.name = name
    return obj


def _orbit_scene(bpy, scene, tmp_path, views=3):
    cube = _cube(bpy)
    settings = scene.mvdiff
    settings.prompt, settings.camera_source, settings.orbit_views, settings.orbit_rings = "stone", "ORBIT", views, 1
    settings.width = settings.height = 64
    settings.output_dir = str(tmp_path / "out")
    bpy.ops.object.select_all(action="DESELECT")
    cube.select_set(True)
    return cube


def test_opening_a_file_during_a_job_resets_the_job(addon, scene):
    import bpy

    ops = addon.operators
    running = ops.RunningJob("texture")
    ops._active = running
    bpy.context.window_manager.mvdiff.running = True
    try:
        bpy.ops.wm.read_homefile(use_empty=True)
        assert ops.active_job() is None and running.cancelled
        assert not bpy.context.window_manager.mvdiff.running
        assert "another file was opened" in bpy.context.window_manager.mvdiff.message
    finally:
        ops._active = None


def test_an_unexpected_error_in_preparation_resets_the_job_panel(addon, scene, remote, tmp_path, monkeypatch):
    import bpy

    _orbit_scene(bpy, scene, tmp_path)

    def broken(_context):
        raise ZeroDivisionError("the unexpected")
        yield

    monkeypatch.setattr(addon.operators, "texture_job_steps", broken)
    with pytest.raises(RuntimeError, match="Preparing the job failed: ZeroDivisionError: the unexpected"):
        bpy.ops.mvdiff.texture()
    state = bpy.context.window_manager.mvdiff
    assert not state.running and "ZeroDivisionError" in state.message
    assert addon.operators.active_job() is None
    assert bpy.ops.mvdiff.texture.poll(), "the next job may start"


def test_depth_is_prepared_one_pose_per_step_and_a_cancel_restores_the_scene(addon, scene, tmp_path):
    import bpy

    _orbit_scene(bpy, scene, tmp_path, views=3)
    engine = scene.render.engine
    objects = sorted(o.name for o in bpy.data.objects)
    steps = addon.job.texture_job_steps(bpy.context)
    assert next(steps) == ("depth", 1, 3)
    assert "MVDiffusion Depth Camera" in bpy.data.objects  # mid-way: the renders are set up
    steps.close()  # Esc between two ticks
    assert scene.render.engine == engine
    assert sorted(o.name for o in bpy.data.objects) == objects, "placed and temporary cameras removed"
    assert addon.cameras.camera_collection(scene) is None or not addon.cameras.placed_cameras(scene)

    progress = []
    prepared = addon.job.run_steps(addon.job.texture_job_steps(bpy.context), lambda *s: progress.append(s))
    assert progress == [("depth", 1, 3), ("depth", 2, 3), ("depth", 3, 3)]
    assert (prepared.folder / "job.npz").is_file() and (prepared.folder / "blender.json").is_file()
    assert scene.render.engine == engine


def test_cancelling_a_long_job_asks_first(addon):
    ops = addon.operators
    job = ops.RunningJob("texture")
    assert not job.needs_confirmation(now=1e9), "nothing sent yet: cancel at once"
    job.sent_at = 100.0
    assert not job.needs_confirmation(now=101.0)
    assert job.needs_confirmation(now=100.0 + ops.CONFIRM_CANCEL_AFTER)

    asked = []
    wm = types.SimpleNamespace(invoke_confirm=lambda op, event, **kw: asked.append(kw) or {"RUNNING_MODAL"},
                               mvdiff=types.SimpleNamespace(message=""))
    context = types.SimpleNamespace(window_manager=wm)
    me = types.SimpleNamespace(execute=lambda ctx: ops.MVDIFF_OT_cancel.execute(me, ctx))
    job.sent_at = 0.0
    ops._active = job
    try:
        assert ops.MVDIFF_OT_cancel.invoke(me, context, None) == {"RUNNING_MODAL"}
        assert asked and not job.cancelled, "a long job is only cancelled once the user confirms"
        job.sent_at = None
        ops.MVDIFF_OT_cancel.invoke(me, context, None)
        assert job.cancelled and len(asked) == 1
    finally:
        ops._active = None


def test_apply_result_applies_a_downloaded_result_again(addon, scene, tmp_path):
    import bpy

    cube = _cube(bpy, "Again")
    folder = tmp_path / "mvdiff_jobs" / "T"
    (folder / "result").mkdir(parents=True)
    prepared = addon.job.PreparedJob("texture", b"", folder, tmp_path / "out", "T", ["Again"])
    prepared.write_record()
    write_texture(folder / "result" / "texture.png", np.full((8, 8, 3), 0.25), 8)
    me = cube.data
    me.calc_loop_triangles()
    write_npz(folder / "result" / "uvs.npz", {"Again": np.full((len(me.loop_triangles), 3, 2), 0.5, np.float32)})
    assert bpy.ops.mvdiff.apply_result(directory=str(folder / "result")) == {"FINISHED"}
    assert "MVDiffusion" in cube.data.uv_layers and (tmp_path / "out" / "T.png").is_file()
    with pytest.raises(RuntimeError, match="not a job folder"):
        bpy.ops.mvdiff.apply_result(directory=str(tmp_path))


def test_walk_cameras_clip_follows_the_scene_size(addon, scene, tmp_path):
    """A room modelled in centimetres (30 m across = 3000 units): nothing may fall beyond the clip end."""
    import bpy

    room = _cube(bpy, "Room", size=3000.0)
    room.scale = (1.0, 1.0, 0.1)
    bpy.context.view_layer.update()
    curve_data = bpy.data.curves.new("Path", "CURVE")
    spline = curve_data.splines.new("POLY")
    spline.points.add(1)
    spline.points[0].co = (-1000.0, 0.0, 0.0, 1.0)
    spline.points[1].co = (1000.0, 0.0, 0.0, 1.0)
    curve = bpy.data.objects.new("Path", curve_data)
    scene.collection.objects.link(curve)
    placed = addon.cameras.place_walk(scene, curve, 3, 24.0)
    corners = addon.cameras.scene_corners(scene)
    for cam in placed:
        far = np.linalg.norm(corners - np.array(cam.matrix_world.translation), axis=1).max()
        assert cam.data.clip_end > far and cam.data.clip_start <= 0.01
    poses = [addon.cameras.pose_of(c) for c in placed]
    depths = addon.render_depth.render_depths(scene, poses, 64, 48, tmp_path / "depth")
    assert (depths > 0).all(), "inside a closed room every pixel hits a wall"


def test_views_that_see_nothing_are_reported_and_none_seeing_anything_is_refused(addon):
    poses = [types.SimpleNamespace(name="Front"), types.SimpleNamespace(name="Away")]
    depths = np.ones((2, 4, 4), np.float32)
    depths[1] = 0.0
    warnings = addon.job._empty_views(poses, depths)
    assert len(warnings) == 1 and "Away" in warnings[0] and "Front" not in warnings[0]
    assert addon.job._empty_views(poses, np.ones((2, 4, 4), np.float32)) == []
    with pytest.raises(addon.job.JobError, match="No camera sees any geometry"):
        addon.job._empty_views(poses, np.zeros((2, 4, 4), np.float32))


def test_view_sizes_snap_to_the_models_multiple(addon, scene):
    from backend.protocol import VIEW_MULTIPLE

    settings = scene.mvdiff
    for name, typed, snapped in (("width", 200, 192), ("height", 100, 128), ("world_view_size", 600, 576)):
        setattr(settings, name, typed)
        assert getattr(settings, name) == snapped
        assert getattr(settings, name) % VIEW_MULTIPLE == 0


def test_every_setting_and_operator_has_a_tooltip(addon):
    import bpy

    missing = []
    classes = [cls for module in addon._modules() for cls in getattr(module, "classes", ())]
    assert classes
    for cls in classes:
        if issubclass(cls, bpy.types.Panel):
            continue
        rna = cls.bl_rna
        if issubclass(cls, bpy.types.Operator):
            if not getattr(cls, "bl_description", "").strip():
                missing.append(cls.__name__)
            module, name = cls.bl_idname.split(".")
            rna = getattr(getattr(bpy.ops, module), name).get_rna_type()
        own = getattr(cls, "__annotations__", {})
        for prop in rna.properties:
            if prop.identifier not in own:
                continue
            if not prop.description.strip():
                missing.append(f"{cls.__name__}.{prop.identifier}")
    assert not missing, f"settings without a tooltip: {missing}"


class _Modal:
    """The modal job operator's logic outside Blender's window manager (the bpy module has no windows):
    the same methods, driven by fake timer and key events, with a context that records the UI calls."""

    def __init__(self, addon, bpy, kind="texture"):
        ops = addon.operators
        base = ops.MVDIFF_OT_texture if kind == "texture" else ops.MVDIFF_OT_make_world

        class Driver(ops._JobOperator):
            kind_label = base.kind_label
            preparation = base.preparation
            apply_result = base.apply_result

            def report(self, level, text):
                self.reports.append((sorted(level)[0], text))

        self.op = Driver()
        self.op.reports = []
        self.timer = object()
        real = bpy.context
        self.status = []
        wm = types.SimpleNamespace(
            mvdiff=real.window_manager.mvdiff, windows=[],
            event_timer_add=lambda *a, **k: self.timer, event_timer_remove=lambda t: None,
            modal_handler_add=lambda op: None, progress_begin=lambda *a: None, progress_update=lambda *a: None,
            progress_end=lambda: None)
        self.context = types.SimpleNamespace(
            window=object(), window_manager=wm, scene=real.scene, preferences=real.preferences,
            selected_objects=list(real.selected_objects), view_layer=real.view_layer,
            evaluated_depsgraph_get=real.evaluated_depsgraph_get,
            workspace=types.SimpleNamespace(status_text_set=self.status.append))

    def start(self):
        """What ``invoke`` does in a window."""
        assert self.op._begin(self.context)
        self.op._steps = self.op.preparation(self.context)
        self.op._timer = self.context.window_manager.event_timer_add(0.2)
        return {"RUNNING_MODAL"}

    def event(self, kind, value="NOTHING"):
        return self.op.modal(self.context, types.SimpleNamespace(type=kind, value=value, timer=self.timer))


def test_the_modal_path_renders_one_pose_per_tick_and_esc_stops_it(addon, scene, remote, tmp_path):
    import bpy

    _orbit_scene(bpy, scene, tmp_path, views=3)
    engine, objects = scene.render.engine, sorted(o.name for o in bpy.data.objects)
    modal = _Modal(addon, bpy)
    modal.start()
    assert modal.event("TIMER") == {"RUNNING_MODAL"}
    assert bpy.context.window_manager.mvdiff.message == "depth 1/3" and "Esc cancels" in modal.status[-1]
    assert modal.event("LEFTMOUSE", "PRESS") == {"RUNNING_MODAL"}, "no edits while depth renders"
    modal.event("ESC", "PRESS")
    assert modal.event("TIMER") == {"CANCELLED"}
    assert scene.render.engine == engine and sorted(o.name for o in bpy.data.objects) == objects
    assert addon.operators.active_job() is None and not bpy.context.window_manager.mvdiff.running
    assert modal.op.reports[-1] == ("WARNING", "Cancelled")

    # To the end: three depth ticks, then the session (to a backend that is not there) ends the job cleanly.
    modal = _Modal(addon, bpy)
    modal.start()
    results = [modal.event("TIMER") for _ in range(4)]
    assert results == [{"RUNNING_MODAL"}] * 4 and modal.op._session is not None
    assert modal.event("MOUSEMOVE") == {"PASS_THROUGH"}, "the UI is usable while the backend works"
    for _ in range(200):
        done = modal.event("TIMER")
        if done != {"PASS_THROUGH"}:
            break
        modal.op._session._thread.join(0.05)
    assert done == {"CANCELLED"} and "cannot reach the backend" in modal.op.reports[-1][1]
    assert addon.operators.active_job() is None and not bpy.context.window_manager.mvdiff.running
    assert not addon.cameras.placed_cameras(scene), "a failed job removes the cameras it placed"


def test_repeat_last_in_a_window_starts_the_modal_path(addon, scene, remote, tmp_path, monkeypatch):
    """Repeat Last calls ``execute``: with a window it must not block Blender for the whole job."""
    import bpy

    class WithWindows:  # bpy as Blender's UI sees it (the bpy module always runs in background mode)
        app = types.SimpleNamespace(background=False)

        def __getattr__(self, name):
            return getattr(bpy, name)

    _orbit_scene(bpy, scene, tmp_path, views=2)
    monkeypatch.setattr(addon.operators, "bpy", WithWindows())
    modal = _Modal(addon, bpy)
    assert modal.op.execute(modal.context) == {"RUNNING_MODAL"}
    assert modal.op._steps is not None and modal.op._session is None, "nothing ran yet: the timer drives it"
    modal.event("ESC", "PRESS")
    assert modal.event("TIMER") == {"CANCELLED"}
    assert addon.operators.active_job() is None


def test_cameras_whose_clip_end_cuts_the_scene_are_named(addon, scene):
    import bpy

    _cube(bpy, "Hall", size=100.0)
    bpy.ops.object.camera_add(location=(0.0, 0.0, 0.0))
    short = bpy.context.object
    short.name, short.data.clip_end = "Short", 10.0
    bpy.ops.object.camera_add(location=(0.0, 0.0, 0.0))
    enough = bpy.context.object
    enough.name, enough.data.clip_end = "Enough", 1000.0
    poses = [addon.cameras.pose_of(c) for c in (short, enough)]
    warnings = addon.job.clipped_views(scene, poses)
    assert len(warnings) == 1 and "Short" in warnings[0] and "Enough" not in warnings[0]
    assert addon.job.clipped_views(scene, poses[1:]) == []
