import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.geometry.cameras import Camera, look_at
from backend.geometry.correspondence import (
    depth_correspondences,
    level_correspondences,
    overlap_matrix,
    query_pixels,
)
from backend.validation import InputError

WIDTH, HEIGHT = 64, 48
PLANE_NORMAL, PLANE_OFFSET = np.array([1.0, 0.0, 0.0]), 5.0  # the wall x = 5


def plane_depth(cam: Camera) -> np.ndarray:
    """Planar depth of the wall x = 5 for every pixel, from the ray-plane intersection."""
    rays = cam.ray_directions()
    return ((PLANE_OFFSET - PLANE_NORMAL @ cam.center) / (rays @ PLANE_NORMAL)).astype(np.float32)


def two_cameras():
    cam_i = Camera.from_fov(60.0, WIDTH, HEIGHT, look_at([0.0, 0.0, 1.0], [5.0, 0.3, 1.1]))
    cam_j = Camera.from_fov(55.0, WIDTH, HEIGHT, look_at([0.5, -0.8, 1.3], [5.0, -0.2, 0.8]))
    return cam_i, cam_j


def plane_homography(cam_i: Camera, cam_j: Camera) -> np.ndarray:
    """x_j ~ K_j (R - t n^T / d) K_i^-1 x_i for the plane n^T X = d in camera i coordinates."""
    relative = cam_j.world_to_cam @ cam_i.cam_to_world
    R, t = relative[:3, :3], relative[:3, 3]
    n_i = cam_i.rotation.T @ PLANE_NORMAL
    d_i = PLANE_OFFSET - PLANE_NORMAL @ cam_i.center
    return cam_j.K @ (R + np.outer(t, n_i) / d_i) @ np.linalg.inv(cam_i.K)


@pytest.mark.parametrize("stride", [1, 8])
def test_plane_correspondences_match_the_homography(stride):
    cam_i, cam_j = two_cameras()
    corr = depth_correspondences(cam_i, plane_depth(cam_i), cam_j, plane_depth(cam_j), stride=stride)
    query = query_pixels(WIDTH, HEIGHT, stride)
    homogeneous = np.concatenate([query, np.ones(query.shape[:-1] + (1,))], -1) @ plane_homography(cam_i, cam_j).T
    expected = homogeneous[..., :2] / homogeneous[..., 2:]
    assert corr.valid.mean() > 0.3
    np.testing.assert_allclose(corr.xy[corr.valid], expected[corr.valid], atol=1e-3)
    # j's depth is read at the nearest pixel, so the error is bounded by the wall's depth slope
    # over half a pixel, far below the occlusion tolerance.
    assert np.abs(corr.depth_error[corr.valid]).max() < 5e-3
    inside = (expected[..., 0] > 0) & (expected[..., 0] < WIDTH - 1) & (expected[..., 1] > 0)
    inside &= expected[..., 1] < HEIGHT - 1
    assert np.array_equal(corr.valid[inside], np.ones(inside.sum(), bool))
    assert not corr.valid[(expected[..., 0] < -1) | (expected[..., 0] > WIDTH)].any()


def test_pixels_hidden_in_the_other_view_are_invalid():
    cam_i, cam_j = two_cameras()
    depth_j = plane_depth(cam_j)
    occluded = depth_j.copy()
    occluded[10:30, 20:40] *= 0.5  # something stands in front of the wall in view j
    clear = depth_correspondences(cam_i, plane_depth(cam_i), cam_j, depth_j)
    blocked = depth_correspondences(cam_i, plane_depth(cam_i), cam_j, occluded)
    col, row = np.rint(clear.xy[..., 0]), np.rint(clear.xy[..., 1])
    hidden = clear.valid & (row >= 10) & (row < 30) & (col >= 20) & (col < 40)
    assert hidden.sum() > 50
    assert not blocked.valid[hidden].any()
    assert np.array_equal(blocked.valid[~hidden], clear.valid[~hidden])


def test_pixels_without_depth_are_invalid():
    cam_i, cam_j = two_cameras()
    depth_i = plane_depth(cam_i)
    depth_i[:, :10] = 0.0
    corr = depth_correspondences(cam_i, depth_i, cam_j, plane_depth(cam_j))
    assert not corr.valid[:, :10].any()


def test_sampling_grid_reads_the_matching_pixel_at_every_level():
    cam_i, cam_j = two_cameras()
    depth_i, depth_j = plane_depth(cam_i), plane_depth(cam_j)
    # An image of view j whose value is its own x coordinate, pooled to each level's size.
    ramp = torch.arange(WIDTH, dtype=torch.float32).repeat(HEIGHT, 1)[None, None]
    for stride in (8, 16):
        corr = depth_correspondences(cam_i, depth_i, cam_j, depth_j, stride=stride)
        level = F.avg_pool2d(ramp, stride)
        grid = torch.from_numpy(corr.sampling_grid(WIDTH, HEIGHT))[None]
        sampled = F.grid_sample(level, grid, align_corners=False)[0, 0].numpy()
        # Pooled pixel k holds the mean x of its block, k*stride + (stride-1)/2: sampling at a
        # landing x gives x back wherever the bilinear footprint stays inside the image.
        x, y = corr.xy[..., 0], corr.xy[..., 1]
        usable = corr.valid & (x > stride) & (x < WIDTH - stride) & (y > stride) & (y < HEIGHT - stride)
        assert usable.any()
        np.testing.assert_allclose(sampled[usable], corr.xy[..., 0][usable], atol=1e-3)


def test_overlap_matrix_is_one_on_the_diagonal_and_zero_for_opposite_views():
    forward = Camera.from_fov(60.0, WIDTH, HEIGHT, look_at([0, 0, 1], [5, 0, 1]))
    nearby = Camera.from_fov(60.0, WIDTH, HEIGHT, look_at([0.2, 0, 1], [5, 0.4, 1]))
    backward = Camera.from_fov(60.0, WIDTH, HEIGHT, look_at([0, 0, 1], [-5, 0, 1]))
    wall_behind = np.full((HEIGHT, WIDTH), 3.0, np.float32)
    depths = [plane_depth(forward), plane_depth(nearby), wall_behind]
    overlap = overlap_matrix([forward, nearby, backward], depths, stride=4)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    assert overlap[0, 1] > 0.7 and overlap[1, 0] > 0.7
    assert overlap[0, 2] == 0.0 and overlap[2, 0] == 0.0


def test_level_correspondences_cover_every_stride_and_neighbour():
    cam_i, cam_j = two_cameras()
    depths = [plane_depth(cam_i), plane_depth(cam_j)]
    result = level_correspondences([cam_i, cam_j], depths, [[1], [0]], strides=(8, 16))
    assert sorted(result) == [8, 16]
    assert result[8][0][0].xy.shape == (HEIGHT // 8, WIDTH // 8, 2)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.__setitem__((0, 0), np.nan), "depth_i"),
        (lambda d: d.__setitem__((0, 0), -1.0), "depth_i"),
    ],
)
def test_bad_depth_names_the_field(change, field):
    cam_i, cam_j = two_cameras()
    depth_i = plane_depth(cam_i)
    change(depth_i)
    with pytest.raises(InputError) as err:
        depth_correspondences(cam_i, depth_i, cam_j, plane_depth(cam_j))
    assert err.value.field == field


def test_mismatched_shapes_name_the_field():
    cam_i, cam_j = two_cameras()
    with pytest.raises(InputError, match="depth_j"):
        depth_correspondences(cam_i, plane_depth(cam_i), cam_j, np.ones((10, 10), np.float32))
    with pytest.raises(InputError, match="depths"):
        overlap_matrix([cam_i, cam_j], [plane_depth(cam_i)])
    with pytest.raises(InputError, match="stride"):
        depth_correspondences(cam_i, plane_depth(cam_i), cam_j, plane_depth(cam_j), stride=7)
