import math

import numpy as np
import pytest

from backend.geometry.cameras import Camera, intrinsics_from_fov, look_at, yaw_pitch_rotation
from backend.validation import InputError


def random_pose(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q, rng.normal(size=3)
    return pose


def test_centred_principal_point_uses_integer_pixel_centres():
    K = intrinsics_from_fov(90.0, 512, 256)
    assert K[0, 2] == 255.5 and K[1, 2] == 127.5
    assert K[0, 0] == pytest.approx(256.0)


def test_project_unproject_round_trip():
    rng = np.random.default_rng(0)
    cam = Camera.from_fov(70.0, 64, 48, random_pose(rng))
    depth = rng.uniform(0.5, 5.0, size=(48, 64))
    points = cam.unproject(depth)
    xy, z = cam.project(points)
    np.testing.assert_allclose(z, depth, rtol=1e-10)
    np.testing.assert_allclose(xy[10, 20], [20.0, 10.0], atol=1e-9)


def test_opencv_axes_look_at():
    cam = Camera.from_fov(90.0, 100, 100, look_at([0, 0, 0], [1, 0, 0]))
    # A point ahead and above lands in the upper half of the image (y down), right is -Y in world.
    xy, z = cam.project(np.array([[2.0, 0.0, 0.5], [2.0, -0.5, 0.0]]))
    assert z[0] == pytest.approx(2.0)
    assert xy[0, 1] < 49.5 and xy[0, 0] == pytest.approx(49.5)
    assert xy[1, 0] > 49.5 and xy[1, 1] == pytest.approx(49.5)


def test_yaw_turns_right_towards_minus_y():
    forward = yaw_pitch_rotation(90.0, 0.0)[:, 2]
    np.testing.assert_allclose(forward, [0, -1, 0], atol=1e-12)
    up_view = yaw_pitch_rotation(0.0, 90.0)[:, 2]
    np.testing.assert_allclose(up_view, [0, 0, 1], atol=1e-12)


def test_scaled_camera_keeps_rays_through_pixel_corners():
    cam = Camera.from_fov(60.0, 256, 192)
    small = cam.scaled(1 / 8)
    assert (small.width, small.height) == (32, 24)
    # The top-left corner of the image (-0.5, -0.5) is the same ray at both resolutions.
    big_ray = cam.ray_directions(np.array([-0.5, -0.5]))
    small_ray = small.ray_directions(np.array([-0.5, -0.5]))
    np.testing.assert_allclose(big_ray, small_ray, atol=1e-12)


def blender_camera(**overrides):
    args = dict(matrix_world=np.eye(4), lens=50.0, sensor_width=36.0, sensor_height=24.0, sensor_fit="AUTO",
                shift_x=0.0, shift_y=0.0, width=1920, height=1080)
    args.update(overrides)
    return Camera.from_blender(**args)


def test_blender_horizontal_fit_focal_and_axes():
    cam = blender_camera()
    assert cam.K[0, 0] == pytest.approx(50.0 / 36.0 * 1920)
    assert cam.K[0, 2] == pytest.approx(959.5) and cam.K[1, 2] == pytest.approx(539.5)
    # Blender cameras look down -Z: a point at z = -3 is 3 units ahead.
    _, z = cam.project(np.array([[0.0, 0.0, -3.0]]))
    assert z[0] == pytest.approx(3.0)
    np.testing.assert_allclose(cam.to_blender_matrix_world(), np.eye(4), atol=1e-12)


def test_blender_vertical_fit_and_portrait_auto_fit():
    vertical = blender_camera(sensor_fit="VERTICAL")
    assert vertical.K[1, 1] == pytest.approx(50.0 / 24.0 * 1080)
    portrait = blender_camera(width=1080, height=1920)
    # AUTO fits the sensor width to the larger image side.
    assert portrait.K[1, 1] == pytest.approx(50.0 / 36.0 * 1920)


def test_blender_shift_moves_principal_point_by_the_fitted_size():
    cam = blender_camera(shift_x=0.1, shift_y=-0.05)
    assert cam.K[0, 2] == pytest.approx(959.5 - 0.1 * 1920)
    assert cam.K[1, 2] == pytest.approx(539.5 - 0.05 * 1920)


def test_blender_object_scale_is_ignored():
    scaled = np.diag([2.0, 2.0, 2.0, 1.0])
    cam = blender_camera(matrix_world=scaled)
    np.testing.assert_allclose(cam.rotation, np.diag([1.0, -1.0, -1.0]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(K=np.eye(3) * 0, cam_to_world=np.eye(4), width=4, height=4), "K"),
        (dict(K=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], cam_to_world=np.eye(4) * 2, width=4, height=4), "cam_to_world"),
        (dict(K=np.eye(3), cam_to_world=np.full((4, 4), np.nan), width=4, height=4), "cam_to_world"),
        (dict(K=np.eye(3), cam_to_world=np.eye(4), width=0, height=4), "width"),
        (dict(K=np.eye(3)[:2], cam_to_world=np.eye(4), width=4, height=4), "K"),
    ],
)
def test_bad_cameras_name_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        Camera(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_bad_blender_values_name_the_field():
    with pytest.raises(InputError, match="sensor_fit"):
        blender_camera(sensor_fit="DIAGONAL")
    with pytest.raises(InputError, match="lens"):
        blender_camera(lens=math.nan)
