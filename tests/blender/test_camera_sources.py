"""Camera sources: selected cameras, an animated camera, orbit and walk placement, and the dispatch
on ``scene.mvdiff.camera_source``."""

import math

import numpy as np
import pytest


def _camera(bpy, scene, name, location=(0.0, 0.0, 0.0), rotation=(0.0, 0.0, 0.0), lens=50.0):
    data = bpy.data.cameras.new(name)
    data.lens = lens
    obj = bpy.data.objects.new(name, data)
    scene.collection.objects.link(obj)
    obj.location, obj.rotation_euler = location, rotation
    return obj


def _cube(bpy, scene, name, location, size):
    import bmesh

    me = bpy.data.meshes.new(name)
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=size)
    bm.to_mesh(me)
    bm.free()
    obj = bpy.data.objects.new(name, me)
    scene.collection.objects.link(obj)
    obj.location = location
    return obj


def _poly_curve(bpy, scene, name, points, cyclic=False, location=(0.0, 0.0, 0.0)):
    data = bpy.data.curves.new(name, "CURVE")
    data.dimensions = "3D"
    spline = data.splines.new("POLY")
    spline.points.add(len(points) - 1)
    for point, co in zip(spline.points, points, strict=True):
        point.co = (*co, 1.0)
    spline.use_cyclic_u = cyclic
    obj = bpy.data.objects.new(name, data)
    scene.collection.objects.link(obj)
    obj.location = location
    bpy.context.view_layer.update()
    return obj


def _forward(pose) -> np.ndarray:
    """World direction a Blender camera looks in (its -Z axis)."""
    return -pose.matrix_world[:3, 2] / np.linalg.norm(pose.matrix_world[:3, 2])


# ---------------------------------------------------------------------- selected
@pytest.mark.blender
def test_selected_cameras_in_name_order(addon, scene):
    import bpy

    cams = {n: _camera(bpy, scene, n, location=(i, 0, 0)) for i, n in enumerate(["Cam.B", "Cam.A", "Cam.C"])}
    mesh = _cube(bpy, scene, "cube", (0, 0, 0), 1.0)
    bpy.context.view_layer.update()
    poses = addon.cameras.poses_from_selected([cams["Cam.B"], mesh, cams["Cam.C"], cams["Cam.A"]])
    assert [p.name for p in poses] == ["Cam.A", "Cam.B", "Cam.C"]
    for pose in poses:
        np.testing.assert_allclose(pose.matrix_world, np.array(cams[pose.name].matrix_world))
        assert pose.lens == 50.0 and pose.sensor_width == 36.0

    with pytest.raises(addon.cameras.CameraError, match="Select one or more cameras"):
        addon.cameras.poses_from_selected([mesh])
    with pytest.raises(addon.cameras.CameraError, match="Select one or more cameras"):
        addon.cameras.poses_from_selected([])
    cams["Cam.A"].data.type = "ORTHO"
    with pytest.raises(addon.cameras.CameraError, match="'Cam.A'.*perspective"):
        addon.cameras.poses_from_selected(list(cams.values()))


# ---------------------------------------------------------------------- animated
def _animated_camera(bpy, scene):
    cam = _camera(bpy, scene, "Flying", rotation=(math.pi / 2, 0, 0))
    for frame, x, lens in ((1, 0.0, 20.0), (11, 10.0, 40.0)):
        cam.location = (x, 0.0, 1.5)
        cam.keyframe_insert("location", frame=frame)
        cam.data.lens = lens
        cam.data.keyframe_insert("lens", frame=frame)
    return cam


@pytest.mark.blender
def test_animated_camera_poses_follow_keyframes_and_keep_frame(addon, scene):
    import bpy

    # New keys interpolate linearly (5.0 moved F-curves into channel bags; the preference is simpler).
    edit = bpy.context.preferences.edit
    interpolation, edit.keyframe_new_interpolation_type = edit.keyframe_new_interpolation_type, "LINEAR"
    try:
        cam = _animated_camera(bpy, scene)
    finally:
        edit.keyframe_new_interpolation_type = interpolation
    scene.camera = cam
    scene.frame_set(7)
    poses = addon.cameras.poses_from_animation(scene, None, 1, 11, 5)
    assert scene.frame_current == 7
    assert [p.name for p in poses] == ["Flying@1", "Flying@6", "Flying@11"]
    np.testing.assert_allclose([p.matrix_world[0, 3] for p in poses], [0.0, 5.0, 10.0], atol=1e-5)
    np.testing.assert_allclose([p.lens for p in poses], [20.0, 30.0, 40.0], atol=1e-4)
    # The frame range end is included only when the step lands on it.
    assert len(addon.cameras.poses_from_animation(scene, cam, 1, 10, 4)) == 3

    with pytest.raises(addon.cameras.CameraError, match="End"):
        addon.cameras.poses_from_animation(scene, cam, 5, 4, 1)
    scene.camera = None
    with pytest.raises(addon.cameras.CameraError, match="No animated camera"):
        addon.cameras.poses_from_animation(scene, None, 1, 5, 1)
    # A failure midway (an orthographic camera) still puts the frame back.
    cam.data.type = "ORTHO"
    with pytest.raises(addon.cameras.CameraError, match="Flying"):
        addon.cameras.poses_from_animation(scene, cam, 1, 11, 5)
    assert scene.frame_current == 7


# ---------------------------------------------------------------------- orbit
@pytest.mark.blender
def test_orbit_rings_look_at_the_centre(addon, scene):
    import bpy

    cubes = [_cube(bpy, scene, "a", (1.0, 2.0, 0.5), 1.0), _cube(bpy, scene, "b", (3.0, 2.0, 0.5), 1.0)]
    bpy.context.view_layer.update()
    # Bounding box x 0.5..3.5, y 1.5..2.5, z 0..1: centre (2, 2, 0.5), radius |(1.5, 0.5, 0.5)|.
    centre, radius = np.array([2.0, 2.0, 0.5]), math.sqrt(1.5**2 + 0.5**2 + 0.5**2)
    placed = addon.cameras.place_orbit(scene, cubes, 6, 3, math.radians(60), 2.5, 30.0)
    coll = bpy.data.collections[addon.cameras.COLLECTION_NAME]
    assert coll.name in scene.collection.children
    assert len(placed) == 18 and sorted(o.name for o in coll.objects) == sorted(o.name for o in placed)
    elevations = set()
    for obj in placed:
        pose = addon.cameras.pose_of(obj)
        eye = pose.matrix_world[:3, 3]
        offset = eye - centre
        assert np.linalg.norm(offset) == pytest.approx(2.5 * radius, rel=1e-6)
        np.testing.assert_allclose(_forward(pose), -offset / np.linalg.norm(offset), atol=1e-6)
        assert abs(pose.matrix_world[2, 0]) < 1e-6  # camera x axis horizontal: level horizon
        assert pose.lens == 30.0 and pose.sensor_width == 36.0
        elevations.add(round(math.degrees(math.asin(offset[2] / np.linalg.norm(offset))), 4))
    assert elevations == {0.0, 30.0, 60.0}

    # Placing again replaces only the collection's cameras: the user's camera and an empty stay.
    user_cam = _camera(bpy, scene, "UserCam")
    empty = bpy.data.objects.new("Marker", None)
    coll.objects.link(empty)
    cameras_before = len(bpy.data.cameras)
    again = addon.cameras.place_orbit(scene, cubes, 4, 1, math.radians(20), 2.0, 24.0)
    assert len(again) == 4
    assert sorted(o.name for o in coll.objects) == sorted([o.name for o in again] + ["Marker"])
    assert bpy.data.objects.get("UserCam") is user_cam and bpy.data.objects.get("Marker") is empty
    assert len(bpy.data.cameras) == cameras_before - 18 + 4
    for obj in again:
        offset = np.array(obj.matrix_world.translation) - centre
        assert math.degrees(math.asin(offset[2] / np.linalg.norm(offset))) == pytest.approx(20.0, abs=1e-4)

    with pytest.raises(addon.cameras.CameraError, match="Select the mesh"):
        addon.cameras.place_orbit(scene, [], 4, 1, 0.3, 2.0, 24.0)


# ---------------------------------------------------------------------- walk
@pytest.mark.blender
def test_walk_cameras_follow_the_curve(addon, scene):
    import bpy

    # An L-shaped path 4 m along +X then 3 m along +Y, 1.6 m high, moved by the object's location.
    curve = _poly_curve(bpy, scene, "path", [(0, 0, 0), (4, 0, 0), (4, 3, 0)], location=(1.0, 2.0, 1.6))
    placed = addon.cameras.place_walk(scene, curve, 8, 20.0)
    assert [o.name for o in placed] == [f"MVDiffusion Walk {i:03d}" for i in range(8)]
    poses = [addon.cameras.pose_of(o) for o in placed]
    origin = np.array([1.0, 2.0, 1.6])
    for k, pose in enumerate(poses):  # evenly spaced: 1 m apart along the 7 m path
        s = float(k)
        expected = origin + (np.array([s, 0, 0]) if s <= 4 else np.array([4, s - 4, 0]))
        np.testing.assert_allclose(pose.matrix_world[:3, 3], expected, atol=1e-5)
        assert abs(pose.matrix_world[2, 0]) < 1e-6  # level horizon
        if s < 4:
            np.testing.assert_allclose(_forward(pose), [1, 0, 0], atol=1e-6)
        elif s > 4:
            np.testing.assert_allclose(_forward(pose), [0, 1, 0], atol=1e-6)
        assert pose.lens == 20.0
    assert len(addon.cameras.placed_cameras(scene)) == 8

    # A closed loop: a 2 x 2 square, 4 cameras one per side start, looking along the loop.
    square = _poly_curve(bpy, scene, "loop", [(0, 0, 1), (2, 0, 1), (2, 2, 1), (0, 2, 1)], cyclic=True)
    loop = [addon.cameras.pose_of(o) for o in addon.cameras.place_walk(scene, square, 8, 20.0)]
    assert len(addon.cameras.placed_cameras(scene)) == 8  # replaced, not added
    np.testing.assert_allclose(loop[1].matrix_world[:3, 3], [1, 0, 1], atol=1e-5)
    np.testing.assert_allclose(_forward(loop[1]), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(loop[5].matrix_world[:3, 3], [1, 2, 1], atol=1e-5)
    np.testing.assert_allclose(_forward(loop[5]), [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(_forward(loop[7]), [0, -1, 0], atol=1e-6)

    empty = bpy.data.objects.new("NotACurve", None)
    with pytest.raises(addon.cameras.CameraError, match="'NotACurve' is not a curve"):
        addon.cameras.place_walk(scene, empty, 4, 20.0)
    assert len(addon.cameras.placed_cameras(scene)) == 8  # a refused placement keeps the cameras


# ---------------------------------------------------------------------- settings
@pytest.mark.blender
def test_poses_for_settings_reuses_edited_cameras(addon, scene):
    import bpy

    cube = _cube(bpy, scene, "cube", (0, 0, 1), 2.0)
    bpy.context.view_layer.update()
    settings = scene.mvdiff
    settings.camera_source, settings.orbit_views, settings.orbit_rings = "ORBIT", 4, 2
    first = addon.cameras.poses_for_settings(bpy.context, settings, [cube], [cube])
    assert len(first) == 8
    names = addon.cameras.placed_camera_names(scene)
    assert [p.name for p in first] == names

    # The user moves one camera and changes its lens: the next job uses the edited camera.
    edited = bpy.data.objects[names[2]]
    edited.location.z += 1.0
    edited.data.lens = 85.0
    bpy.context.view_layer.update()
    second = addon.cameras.poses_for_settings(scene, settings, [cube], [cube])
    assert addon.cameras.placed_camera_names(scene) == names
    assert second[2].lens == 85.0
    np.testing.assert_allclose(second[2].matrix_world, np.array(edited.matrix_world))

    # Other settings: the cameras are placed anew.
    settings.orbit_views = 3
    assert len(addon.cameras.poses_for_settings(scene, settings, [cube], [cube])) == 6

    # Walk without a curve, a bad resolution, and the selected source.
    settings.camera_source = "WALK"
    with pytest.raises(addon.cameras.CameraError, match="walk_curve"):
        addon.cameras.poses_for_settings(scene, settings, [cube], [cube])
    settings.camera_source, settings.width = "SELECTED", 500
    assert settings.width == 512, "the UI snaps the view size to the model's multiple"
    import types

    with pytest.raises(addon.cameras.CameraError, match="width"):
        addon.cameras.poses_for_settings(scene, types.SimpleNamespace(width=500, height=384, camera_source="SELECTED"),
                                         [cube], [cube])
    cam = _camera(bpy, scene, "Solo")
    assert [p.name for p in addon.cameras.poses_for_settings(scene, settings, [cube], [cube, cam])] == ["Solo"]
    assert addon.cameras.job_resolution(settings) == (512, settings.height)

    # remove_cameras takes only the named cameras out of the collection.
    names = addon.cameras.placed_camera_names(scene)
    addon.cameras.remove_cameras(scene, names[:2])
    assert addon.cameras.placed_camera_names(scene) == names[2:]
    assert bpy.data.objects.get("Solo") is cam
    # Removing the last ones removes the collection too (a failed job leaves no trace).
    addon.cameras.remove_cameras(scene, names[2:])
    assert addon.cameras.camera_collection(scene) is None
    assert bpy.data.objects.get("Solo") is cam
