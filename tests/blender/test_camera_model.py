"""The backend's camera model against Blender's own projection of the same camera."""

import numpy as np
import pytest

from backend.geometry.cameras import Camera

CASES = [
    dict(lens=35.0, sensor_fit="AUTO", shift_x=0.0, shift_y=0.0, res=(256, 192), aspect=(1, 1)),
    dict(lens=24.0, sensor_fit="AUTO", shift_x=0.12, shift_y=-0.07, res=(192, 256), aspect=(1, 1)),
    dict(lens=50.0, sensor_fit="VERTICAL", shift_x=-0.05, shift_y=0.1, res=(320, 180), aspect=(1, 1)),
    dict(lens=18.0, sensor_fit="HORIZONTAL", shift_x=0.0, shift_y=0.2, res=(200, 300), aspect=(1, 1)),
    dict(lens=30.0, sensor_fit="AUTO", shift_x=0.03, shift_y=0.04, res=(240, 160), aspect=(1, 2)),
]


@pytest.mark.blender
@pytest.mark.parametrize("case", CASES)
def test_projection_matches_blender_view_frame(bpy_empty, case):
    bpy = bpy_empty
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Euler, Vector

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = case["res"]
    scene.render.resolution_percentage = 100
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = case["aspect"]
    data = bpy.data.cameras.new("cam")
    data.lens, data.sensor_width, data.sensor_height = case["lens"], 36.0, 24.0
    data.sensor_fit, data.shift_x, data.shift_y = case["sensor_fit"], case["shift_x"], case["shift_y"]
    obj = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(obj)
    obj.location = (1.0, -2.0, 1.5)
    obj.rotation_euler = Euler((1.2, 0.1, 0.7))
    obj.scale = (1.5, 1.5, 1.5)
    bpy.context.view_layer.update()

    cam = Camera.from_blender(
        matrix_world=np.array(obj.matrix_world), lens=data.lens, sensor_width=data.sensor_width,
        sensor_height=data.sensor_height, sensor_fit=data.sensor_fit, shift_x=data.shift_x, shift_y=data.shift_y,
        width=case["res"][0], height=case["res"][1], pixel_aspect_x=case["aspect"][0],
        pixel_aspect_y=case["aspect"][1],
    )
    rng = np.random.default_rng(1)
    width, height = case["res"]
    # Points spread over the frame at several depths.
    depth = rng.uniform(1.0, 8.0, size=20)
    xy_expected = rng.uniform([0, 0], [width - 1, height - 1], size=(20, 2))
    points = cam.unproject(depth, xy_expected)
    for point, want, z in zip(points, xy_expected, depth, strict=True):
        ndc = world_to_camera_view(scene, obj, Vector(point))
        # view-frame coordinates run 0..1 from the bottom-left corner of the frame
        got = np.array([ndc.x * width - 0.5, (1.0 - ndc.y) * height - 0.5])
        np.testing.assert_allclose(got, want, atol=1e-3)
        assert ndc.z == pytest.approx(z, rel=1e-5)
