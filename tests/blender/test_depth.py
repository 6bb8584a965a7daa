"""Cycles depth through the add-on: planar z, 0 for background, equal to the backend's raster depth,
and a scene left exactly as it was (also after a failed render)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.geometry.cameras import Camera
from backend.geometry.render import render_depth
from backend.scenes.demo_room import build_demo_room

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import blender_demo_room  # noqa: E402

SIMPLE_TYPES = ("BOOLEAN", "INT", "FLOAT", "STRING", "ENUM")


def _props(struct) -> dict:
    """Every plain setting of an RNA struct (pointers by name), for before/after comparisons."""
    out = {}
    for prop in struct.bl_rna.properties:
        name = prop.identifier
        # use_nodes is deprecated in 5.0 and warns when read. users: Blender 5.0.1 counts every
        # compositor Render Layers node after the first one twice (and once on removal), so the
        # scene's user count grows by one per depth render call; it is not a setting, and a reload
        # recounts it.
        if name in ("rna_type", "use_nodes", "users"):
            continue
        try:
            value = getattr(struct, name)
        except AttributeError:
            continue
        if prop.type in SIMPLE_TYPES:
            if getattr(prop, "is_array", False) or prop.type == "ENUM" and prop.is_enum_flag:
                value = tuple(value)
            out[name] = value
        elif prop.type == "POINTER" and isinstance(getattr(value, "name", None), str) and hasattr(value, "users"):
            out[name] = ("ID", value.name)
        elif prop.type == "POINTER" and value is None:
            out[name] = None
    return out


def snapshot(bpy, scene, compat) -> dict:
    layer = scene.view_layers[0]
    return {
        "scene": _props(scene),
        "render": _props(scene.render),
        "cycles": _props(scene.cycles),
        "layer": _props(layer),
        "layer_cycles": _props(layer.cycles),
        "objects": sorted(o.name for o in bpy.data.objects),
        "scene_objects": sorted(o.name for o in scene.collection.all_objects),
        "cameras": sorted(c.name for c in bpy.data.cameras),
        "compositor": _compositor(compat, scene),
        "images": sorted(i.name for i in bpy.data.images),
        "node_groups": sorted(g.name for g in bpy.data.node_groups),
        "materials": sorted(m.name for m in bpy.data.materials),
        "meshes": sorted(m.name for m in bpy.data.meshes),
    }


def assert_same(after: dict, before: dict) -> None:
    """Equal snapshots; on failure the message lists only the settings that changed."""
    changed = []
    for group, values in before.items():
        if isinstance(values, dict):
            changed += [f"{group}.{k}: {v!r} -> {after[group].get(k)!r}" for k, v in values.items()
                        if after[group].get(k) != v]
        elif after[group] != values:
            changed.append(f"{group}: {values!r} -> {after[group]!r}")
    assert not changed, "changed: " + "; ".join(changed)


def as_backend_camera(camera) -> Camera:
    """The add-on's Camera lives in ``bl_ext...backend``: rebuild it as the top-level backend's class."""
    return Camera(np.array(camera.K), np.array(camera.cam_to_world), camera.width, camera.height)


def _plane(bpy, name, corners):
    me = bpy.data.meshes.new(name)
    me.from_pydata([tuple(c) for c in corners], [], [list(range(len(corners)))])
    obj = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _pose(addon, matrix=None, lens=20.0, **kw):
    params = dict(sensor_width=36.0, sensor_height=24.0, sensor_fit="AUTO", shift_x=0.0, shift_y=0.0,
                  clip_start=0.01, clip_end=1000.0)
    params.update(kw)
    return addon.cameras.Pose(np.eye(4) if matrix is None else matrix, lens, **params)


def _user_settings(bpy, scene, compat):
    """A scene whose settings differ from everything render_depths sets, so restoring is really tested."""
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 50
    scene.render.pixel_aspect_x = 2.0
    scene.render.use_persistent_data = False
    scene.render.use_compositing = False
    scene.render.use_border = True
    scene.render.use_motion_blur = True
    scene.cycles.samples = 77
    scene.cycles.use_denoising = True
    scene.cycles.max_bounces = 9
    scene.cycles.device = "CPU"
    layer = scene.view_layers[0]
    layer.use_pass_z = False
    layer.use_pass_normal = True
    layer.samples = 5
    user_cam = bpy.data.objects.new("UserCam", bpy.data.cameras.new("UserCam"))
    scene.collection.objects.link(user_cam)
    scene.camera = user_cam
    if compat.COMPOSITOR_IS_NODE_GROUP:
        group = bpy.data.node_groups.new("UserCompositor", "CompositorNodeTree")
        group.use_fake_user = True
        scene.compositing_node_group = group
    else:  # 4.x: the scene's own tree, with a File Output of the user's that must stay untouched
        scene.use_nodes = True
        scene.node_tree.nodes.new("CompositorNodeOutputFile").name = "UserFileOutput"
    scene.frame_set(7)


def _compositor(compat, scene) -> list:
    """The compositor's nodes and their mute state (4.x keeps the user's nodes in scene.node_tree)."""
    tree = compat.compositor_tree(scene)
    return sorted((n.name, n.bl_idname, n.mute) for n in tree.nodes) if tree is not None else []


@pytest.mark.blender
def test_plane_depth_is_planar_distance_and_zero_where_empty(addon, scene, tmp_path):
    import bpy

    # A plane 3 m in front of a camera at the origin (looking down -Z), covering x < 0 only.
    _plane(bpy, "plane", [(-20, -20, -3), (0, -20, -3), (0, 20, -3), (-20, 20, -3)])
    width, height = 128, 96
    depth = addon.render_depth.render_depths(scene, [_pose(addon)], width, height, tmp_path / "d")
    assert depth.shape == (1, height, width) and depth.dtype == np.float32
    left, right = depth[0, :, : width // 2], depth[0, :, width // 2:]
    # Planar z: 3 everywhere, although the corner rays travel ~4 m.
    np.testing.assert_allclose(left, 3.0, atol=1e-4)
    assert np.all(right == 0.0)
    assert not (tmp_path / "d").exists()


@pytest.mark.blender
def test_demo_room_depth_matches_backend_raster(addon, scene, tmp_path):
    import bpy

    blender_demo_room.build_demo_room_objects(bpy)
    room = build_demo_room()
    width, height = 128, 96
    poses = blender_demo_room.demo_poses(24, width, height, pose_class=addon.cameras.Pose)[::6]
    depths = addon.render_depth.render_depths(scene, poses, width, height, tmp_path)
    assert depths.shape == (4, height, width)
    for pose, depth in zip(poses, depths, strict=True):
        camera = as_backend_camera(pose.to_camera(width, height))
        reference = render_depth(room.mesh, camera)
        hit = (depth > 0) & (reference > 0)
        assert hit.mean() > 0.999  # a closed room: every pixel sees a surface
        diff = np.abs(depth - reference)[hit]
        assert np.median(diff) < 1e-4
        assert np.mean(diff < 1e-3) > 0.995  # only pixels on silhouette edges may differ (measured: none)
        # Unprojected Cycles depth lands on the backend's surfaces: same points, to a few mm.
        points = camera.unproject(depth)
        expected = camera.unproject(reference)
        error = np.linalg.norm(points - expected, axis=-1)[hit]
        assert np.median(error) < 1e-4 and np.mean(error < 5e-3) > 0.99


@pytest.mark.blender
def test_settings_restored_and_nothing_left_behind(addon, scene, tmp_path):
    import bpy

    _user_settings(bpy, scene, addon.compat)
    _plane(bpy, "plane", [(-20, -20, -3), (20, -20, -3), (20, 20, -3), (-20, 20, -3)])
    before = snapshot(bpy, scene, addon.compat)
    progress = []
    depth = addon.render_depth.render_depths(scene, [_pose(addon), _pose(addon, lens=35.0)], 64, 64, tmp_path,
                                             on_progress=lambda i, n: progress.append((i, n)))
    np.testing.assert_allclose(depth, 3.0, atol=1e-4)
    assert progress == [(1, 2), (2, 2)]
    assert_same(snapshot(bpy, scene, addon.compat), before)
    assert scene.frame_current == 7
    assert list(tmp_path.iterdir()) == []


@pytest.mark.blender
def test_settings_restored_after_failed_render(addon, scene, tmp_path, monkeypatch):
    import bpy

    _user_settings(bpy, scene, addon.compat)
    _plane(bpy, "plane", [(-20, -20, -3), (20, -20, -3), (20, 20, -3), (-20, 20, -3)])
    before = snapshot(bpy, scene, addon.compat)
    module = addon.render_depth
    original = module._render_one
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first pose renders, the second fails midway
            raise module.DepthRenderError("simulated render failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_render_one", failing)
    with pytest.raises(module.DepthRenderError, match="simulated"):
        module.render_depths(scene, [_pose(addon)] * 3, 64, 64, tmp_path / "w")
    assert_same(snapshot(bpy, scene, addon.compat), before)
    assert not (tmp_path / "w").exists()

    # A caller cancelling from the progress callback gets the same clean scene.
    monkeypatch.setattr(module, "_render_one", original)

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        module.render_depths(scene, [_pose(addon)] * 3, 64, 64, tmp_path / "w", on_progress=cancel)
    assert_same(snapshot(bpy, scene, addon.compat), before)


@pytest.mark.blender
def test_real_render_error_is_reported_and_cleaned_up(addon, scene, tmp_path, monkeypatch):
    """A render that writes no EXR (here: the compositor is left without its File Output) fails clearly."""
    import bpy

    module = addon.render_depth
    original = module.compat.setup_depth_compositor

    def broken(scene_, layer, directory, prefix, state):
        original(scene_, layer, directory, prefix, state)
        tree = module.compat.compositor_tree(scene_)
        for node in [n for n in tree.nodes if n.bl_idname == "CompositorNodeOutputFile"]:
            tree.nodes.remove(node)

    monkeypatch.setattr(module.compat, "setup_depth_compositor", broken)
    before = snapshot(bpy, scene, addon.compat)
    with pytest.raises(module.DepthRenderError, match="wrote 0 EXR files"):
        module.render_depths(scene, [_pose(addon)], 64, 64, tmp_path)
    after = snapshot(bpy, scene, addon.compat)
    if not addon.compat.COMPOSITOR_IS_NODE_GROUP and before["scene"]["node_tree"] is None:
        # 4.x cannot delete a scene's embedded tree once made: Blender's default one stays, unused.
        assert not scene.use_nodes
        assert after["compositor"] == [("Composite", "CompositorNodeComposite", False),
                                       ("Render Layers", "CompositorNodeRLayers", False)]
        for snap in (before, after):
            snap["scene"].pop("node_tree")
            snap.pop("compositor")
    assert_same(after, before)


@pytest.mark.blender
def test_pose_from_blender_camera_round_trips(addon, scene):
    import bpy
    from mathutils import Euler

    data = bpy.data.cameras.new("cam")
    data.lens, data.shift_x, data.shift_y = 28.0, 0.1, -0.05
    obj = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(obj)
    obj.location, obj.rotation_euler = (1, 2, 3), Euler((1.1, 0.2, math.pi / 3))
    bpy.context.view_layer.update()
    pose = addon.cameras.pose_of(obj)
    camera = pose.to_camera(256, 192)
    np.testing.assert_allclose(camera.center, [1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(camera.K[0, 0], 28.0 / 36.0 * 256)
    np.testing.assert_allclose(camera.K[0, 2], 127.5 - 0.1 * 256)
