"""Panorama layout, rotation correspondences and equirect resampling, against analytic geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.eval.image_metrics import psnr
from backend.eval.panorama_metrics import seam_discontinuity
from backend.geometry.cameras import Camera, yaw_pitch_rotation
from backend.geometry.equirect import (
    direction_to_equirect_uv,
    equirect_directions,
    equirect_to_perspective,
    project_directions,
    stitch_equirect,
)
from backend.geometry.panorama import (
    neighbour_views,
    neighbourhood_offsets,
    panorama_layout,
    pole_latitude_limit,
    ring_latitude_limit,
    rotation_correspondences,
)
from backend.scenes.sky import sphere_pattern
from backend.validation import InputError


def latitude_deg(dirs: np.ndarray) -> np.ndarray:
    return np.degrees(np.arcsin(np.clip(dirs[..., 2], -1.0, 1.0)))


def views_seeing(cameras: list[Camera], dirs: np.ndarray) -> np.ndarray:
    return np.stack([project_directions(camera, dirs)[1] for camera in cameras])


# ---------------------------------------------------------------------------- layout
def test_layout_is_mvdiffusion_ring_then_poles():
    cameras = panorama_layout()
    assert len(cameras) == 10
    for k, camera in enumerate(cameras[:8]):
        yaw = math.radians(45.0 * k)
        np.testing.assert_allclose(camera.rotation[:, 2], [math.cos(yaw), -math.sin(yaw), 0.0], atol=1e-12)
        np.testing.assert_allclose(camera.K, [[256.0, 0, 255.5], [0, 256.0, 255.5], [0, 0, 1]])
    np.testing.assert_allclose(cameras[2].rotation[:, 2], [0.0, -1.0, 0.0], atol=1e-12)  # yaw 90 faces -Y
    np.testing.assert_allclose(cameras[8].rotation[:, 2], [0.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(cameras[9].rotation[:, 2], [0.0, 0.0, -1.0], atol=1e-12)
    assert cameras[8].fov_x_deg == pytest.approx(120.0)
    assert all(np.allclose(camera.center, 0.0) for camera in cameras)


def test_layout_covers_the_whole_sphere_and_the_ring_alone_does_not():
    dirs = equirect_directions(180, 360)
    seen_by = views_seeing(panorama_layout(size=64), dirs).sum(axis=0)
    assert seen_by.min() >= 1
    ring_only = views_seeing(panorama_layout(size=64, pole_views=False), dirs).any(axis=0)
    lat = np.abs(latitude_deg(dirs))
    assert ring_latitude_limit(8, 90.0) == pytest.approx(42.734, abs=1e-3)
    assert ring_only[lat < 42.6].all()
    assert not ring_only[lat > 45.1].any()


def test_adjacent_ring_views_share_45_degrees_of_yaw():
    cameras = panorama_layout(size=512, pole_views=False)
    yaw = np.radians(np.arange(-90.0, 135.0, 0.01))
    horizon = np.stack([np.cos(yaw), -np.sin(yaw), np.zeros_like(yaw)], axis=-1)
    both = views_seeing(cameras[:2], horizon).all(axis=0)
    shared = np.degrees(yaw[both])
    assert shared.min() == pytest.approx(0.0, abs=0.02)
    assert shared.max() == pytest.approx(45.0, abs=0.02)
    # Area share of view 0 seen by view 1: integral of min(1, (x + 1) / sqrt 2) over x in [0, 1], halved.
    cut = math.sqrt(2.0) - 1.0
    expected = (math.sqrt(2.0) * (cut**2 / 2 + cut) + 2.0 * (1.0 - cut)) / 4.0
    assert rotation_correspondences(cameras[0], cameras[1]).overlap == pytest.approx(expected, abs=3e-3)


def test_pole_views_overlap_the_ring_at_every_longitude():
    cameras = panorama_layout(size=64)
    dirs = equirect_directions(360, 720)
    lat = latitude_deg(dirs)
    seen = views_seeing(cameras, dirs)
    ring, top, bottom = seen[:8].any(axis=0), seen[8], seen[9]
    band = (lat > pole_latitude_limit(120.0) + 0.3) & (lat < ring_latitude_limit(8, 90.0) - 0.3)
    assert band[:, 0].sum() >= 20  # rows of 0.5 degrees: a band of at least 10 degrees
    assert (ring & top)[band].all()
    assert (ring & bottom)[band[::-1]].all()
    with pytest.raises(InputError) as error:
        panorama_layout(pole_fov_deg=90.0)  # a cube face only touches the ring at 22.5 degree midpoints
    assert error.value.field == "pole_fov_deg"


def test_neighbour_graph_of_the_default_layout():
    neighbours = neighbour_views(panorama_layout(size=64))
    for k in range(8):
        assert neighbours[k] == sorted([(k - 1) % 8, (k + 1) % 8, 8, 9])
    assert neighbours[8] == list(range(8))
    assert neighbours[9] == list(range(8))


def test_neighbourhood_offsets():
    offsets = neighbourhood_offsets(3)
    assert offsets.shape == (9, 2) and offsets.dtype.kind == "i"
    assert offsets[4].tolist() == [0, 0]
    assert {tuple(o) for o in offsets.tolist()} == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert neighbourhood_offsets(5).min() == -2
    with pytest.raises(InputError) as error:
        neighbourhood_offsets(4)
    assert error.value.field == "k"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ring_views": 0}, "ring_views"),
        ({"size": -1}, "size"),
        ({"fov_deg": 45.0}, "fov_deg"),  # 8 views of 45 degrees only touch
        ({"fov_deg": 180.0}, "fov_deg"),
        ({"pole_fov_deg": float("nan")}, "pole_fov_deg"),
    ],
)
def test_layout_rejects_bad_arguments(kwargs, field):
    with pytest.raises(InputError) as error:
        panorama_layout(**kwargs)
    assert error.value.field == field


# ---------------------------------------------------------------------------- correspondences
def test_rotation_correspondences_match_the_analytic_homography():
    view0, view1 = panorama_layout(size=512, pole_views=False)[:2]
    corr = rotation_correspondences(view0, view1)
    assert corr.xy.shape == (512, 512, 2) and corr.depth_error is None

    def expected(x: float, y: float) -> tuple[float, float]:
        # Normalised coordinates of view 0 rotated 45 degrees to the left into view 1.
        a, b = (x - 255.5) / 256.0, (y - 255.5) / 256.0
        return 255.5 + 256.0 * (a - 1.0) / (a + 1.0), 255.5 + 256.0 * math.sqrt(2.0) * b / (a + 1.0)

    for x, y in [(511, 255), (511, 0), (400, 300), (256, 256), (300, 500)]:
        np.testing.assert_allclose(corr.xy[y, x], expected(x, y), atol=1e-3)
    # View 0's right border is view 1's centre column.
    np.testing.assert_allclose(corr.xy[255, 511], [255.25, 255.146], atol=1e-3)
    assert not corr.valid[:, :256].any()  # the left half of view 0 is out of view 1
    assert corr.valid[100:412, 256:].all()
    assert not corr.valid[0, 256]  # top corner near the centre: above view 1's top edge
    strided = rotation_correspondences(view0, view1, stride=8)
    np.testing.assert_array_equal(strided.xy, corr.xy[4::8, 4::8])
    np.testing.assert_array_equal(strided.valid, corr.valid[4::8, 4::8])


def test_rotation_correspondences_reject_points_behind_the_target():
    cameras = panorama_layout(size=64, pole_views=False)
    opposite = rotation_correspondences(cameras[0], cameras[4])
    assert not opposite.valid.any()
    assert np.isfinite(opposite.xy).all()


# ---------------------------------------------------------------------------- equirect convention
def test_equirect_convention_matches_cycles():
    u, v = direction_to_equirect_uv(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, -2.0, 0], [0, 0, 1.0], [0, 0, -1.0]]))
    np.testing.assert_allclose(u[:3], [0.5, 0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(v, [0.5, 0.5, 0.5, 1.0, 0.0], atol=1e-7)
    dirs = equirect_directions(64, 128)
    centre = dirs[31:33, 63:65].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre / np.linalg.norm(centre), [1.0, 0.0, 0.0], atol=1e-12)
    assert dirs[0, :, 2].min() > 0.99 and dirs[-1, :, 2].max() < -0.99  # row 0 is the top
    # A camera turned right (yaw 90) looks at u = 0.75.
    forward = yaw_pitch_rotation(90.0, 0.0)[:, 2]
    assert direction_to_equirect_uv(forward)[0] == pytest.approx(0.75)


def test_equirect_directions_and_uv_invert_each_other():
    height, width = 32, 64
    dirs = equirect_directions(height, width)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-12)
    u, v = direction_to_equirect_uv(dirs)
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    np.testing.assert_allclose(u, (cols + 0.5) / width, atol=1e-12)
    np.testing.assert_allclose(v, 1.0 - (rows + 0.5) / height, atol=1e-12)


@pytest.mark.parametrize("yaw", [180.0, 0.0, 67.0])
def test_equirect_to_perspective_samples_the_right_directions_across_the_wrap(yaw):
    # An equirect whose pixels hold their own direction: a view of it must show its ray directions.
    # Yaw 180 looks straight at u = 0 / 1, where clamping instead of wrapping errs by ~0.02.
    pano = equirect_directions(64, 128).astype(np.float32)
    pose = np.eye(4)
    pose[:3, :3] = yaw_pitch_rotation(yaw, 10.0)
    camera = Camera.from_fov(60.0, 48, 32, pose)
    view = equirect_to_perspective(pano, camera)
    rays = camera.ray_directions()
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    assert view.dtype == np.float32 and view.shape == (32, 48, 3)
    assert np.abs(view - rays).max() < 2e-3


def test_equirect_to_perspective_keeps_uint8():
    pano = np.full((16, 32, 3), 200, np.uint8)
    pano[:, :, 1] = 17
    view = equirect_to_perspective(pano, panorama_layout(size=8)[3])
    assert view.dtype == np.uint8
    assert (view[..., 0] == 200).all() and (view[..., 1] == 17).all()
    with pytest.raises(InputError) as error:
        equirect_to_perspective(np.zeros((16, 16, 3), np.uint8), panorama_layout(size=8)[0])
    assert error.value.field == "equirect"


# ---------------------------------------------------------------------------- stitching
def test_round_trip_through_the_layout_recovers_the_whole_sphere():
    truth = sphere_pattern(equirect_directions(512, 1024))
    cameras = panorama_layout(size=512)
    views = [equirect_to_perspective(truth, camera) for camera in cameras]
    stitched, weight = stitch_equirect(views, cameras, height=512)
    assert stitched.shape == truth.shape and stitched.dtype == np.float32
    assert weight.min() > 0.0  # every pixel, poles included, comes from some view
    value = psnr(truth, stitched)
    print(f"round-trip PSNR {value:.2f} dB")
    assert value >= 40.0  # acceptance criterion
    assert value >= 55.0  # measured ~65; shifting every view by half a pixel drops it to ~40
    seam_truth, seam_round_trip = seam_discontinuity(truth).score, seam_discontinuity(stitched).score
    print(f"seam score: ground truth {seam_truth:.4f}, round trip {seam_round_trip:.4f}")
    # Resampling moves the score by ~1e-4 either way; a real seam multiplies it (see the seam tests).
    assert seam_round_trip <= seam_truth * 1.001


def test_stitch_blends_views_with_weights_that_vanish_at_their_borders():
    camera = panorama_layout(size=64, pole_views=False)[0]
    stitched, weight = stitch_equirect([np.full((64, 64), 0.25, np.float32)], [camera], height=64)
    assert stitched.shape == (64, 128)
    footprint = views_seeing([camera], equirect_directions(64, 128))[0]
    np.testing.assert_array_equal(weight > 0, footprint)
    np.testing.assert_allclose(stitched[footprint], 0.25, atol=1e-6)
    assert (stitched[~footprint] == 0).all()
    assert weight[footprint].max() > 0.9
    # Columns 47 and 48 lie at yaw -46.4 and -43.6 degrees, just outside and inside the left border.
    assert weight[:, 47].max() == 0.0 and 0.0 < weight[:, 48].max() < 0.01


def test_stitch_of_uint8_views_is_float_in_unit_range():
    cameras = panorama_layout(size=32)
    views = [np.full((32, 32, 3), 255, np.uint8) for _ in cameras]
    stitched, weight = stitch_equirect(views, cameras, height=32)
    assert stitched.dtype == np.float32
    np.testing.assert_allclose(stitched, 1.0, atol=1e-6)


def test_stitch_rejects_bad_input():
    cameras = panorama_layout(size=16)
    views = [np.zeros((16, 16, 3), np.float32) for _ in cameras]
    cases = [
        ((views[:3], cameras), "cameras"),
        (([], []), "images"),
        ((views[:2] + [np.full((16, 16, 3), np.nan, np.float32)] + views[3:], cameras), "images[2]"),
        ((views[:1] + [np.zeros((8, 16, 3), np.float32)] + views[2:], cameras), "images[1]"),
        ((views[:1] + [np.zeros((16, 16, 3), np.uint8)] + views[2:], cameras), "images"),
    ]
    for args, field in cases:
        with pytest.raises(InputError) as error:
            stitch_equirect(*args, height=8)
        assert error.value.field == field
