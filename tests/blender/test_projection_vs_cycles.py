"""A mesh vertex projected by the backend's camera model lands where Cycles renders it.

Cycles renders a tilted quad and a triangle in front of nothing through cameras with shift,
non-default lenses and sensor fits. Every pixel whose centre lies inside a polygon projected with
``Camera.project`` must be covered in the Cycles depth, and every pixel whose centre lies outside
must be empty; the Depth pass samples pixel centres, so only centres within ``MARGIN`` px of an edge
are exempt (much stricter than half a pixel). Covered pixels must also carry the planar depth of
the polygon's plane along the backend's pixel ray.
"""

import numpy as np
import pytest
from test_depth import as_backend_camera

from backend.geometry.cameras import look_at

MARGIN = 0.05  # px

CASES = [
    dict(res=(256, 192), lens=35.0, sensor_fit="AUTO", shift=(0.1, -0.05)),
    dict(res=(192, 256), lens=24.0, sensor_fit="AUTO", shift=(-0.08, 0.12)),
    dict(res=(320, 128), lens=20.0, sensor_fit="VERTICAL", shift=(0.03, 0.1)),
    dict(res=(160, 160), lens=18.0, sensor_fit="HORIZONTAL", shift=(0.0, -0.15)),
]

# Two convex polygons in world space, seen from a camera at EYE looking at TARGET.
EYE, TARGET = np.array([0.4, -3.0, 1.3]), np.array([0.1, 0.5, 0.9])
# A planar, convex, tilted quad: origin + a * u + b * v.
QUAD = np.array([-0.4, 0.9, 1.0]) + np.array([[-1.0, -1.0], [1.0, -1.2], [1.1, 1.0], [-0.9, 0.9]]) @ np.array(
    [[0.8, 0.3, 0.1], [-0.1, -0.2, 0.75]])
TRIANGLE = np.array([[0.7, -0.2, 0.6], [1.6, 0.6, 0.9], [0.9, 0.3, 1.8]])


def _signed_inside(xy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance (px) of pixel centres ``xy`` (..., 2) inside a convex 2D polygon; negative outside."""
    area = 0.5 * np.sum(polygon[:, 0] * np.roll(polygon[:, 1], -1) - np.roll(polygon[:, 0], -1) * polygon[:, 1])
    inside = np.full(xy.shape[:-1], np.inf)
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        edge = b - a
        normal = np.array([-edge[1], edge[0]]) / np.linalg.norm(edge) * np.sign(area)
        inside = np.minimum(inside, (xy - a) @ normal)
    return inside


def _plane_depth(camera, polygon: np.ndarray) -> np.ndarray:
    """Planar depth of the polygon's plane along every pixel ray of ``camera`` (H, W)."""
    normal = np.cross(polygon[1] - polygon[0], polygon[2] - polygon[0])
    rays = camera.ray_directions()  # unit camera z, so the ray parameter is the planar depth
    return (normal @ (polygon[0] - camera.center)) / (rays @ normal)


@pytest.mark.blender
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['res'][0]}x{c['res'][1]}-{c['sensor_fit']}")
def test_projected_polygons_match_cycles_coverage(addon, scene, tmp_path, case):
    import bpy

    for name, polygon in (("quad", QUAD), ("triangle", TRIANGLE)):
        me = bpy.data.meshes.new(name)
        me.from_pydata(polygon.tolist(), [], [list(range(len(polygon)))])
        scene.collection.objects.link(bpy.data.objects.new(name, me))
    width, height = case["res"]
    matrix = look_at(EYE, TARGET) @ np.diag([1.0, -1.0, -1.0, 1.0])
    pose = addon.cameras.Pose(matrix, case["lens"], 36.0, 24.0, case["sensor_fit"], *case["shift"], 0.01, 100.0)
    depth = addon.render_depth.render_depths(scene, [pose], width, height, tmp_path)[0]
    camera = as_backend_camera(pose.to_camera(width, height))

    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.stack([xs, ys], axis=-1).astype(np.float64)
    expected_depth = np.zeros((height, width))
    inside_any = np.full((height, width), -np.inf)
    for polygon in (QUAD, TRIANGLE):
        xy, z = camera.project(polygon)
        assert np.all(z > 0)
        inside = _signed_inside(centres, xy)
        # Both polygons are fully in view (so the test is about edges, not the frame border).
        assert inside.max() > 5 and xy.min() > 0 and np.all(xy.max(axis=0) < [width - 1, height - 1])
        assert not np.any((inside > -1) & (inside_any > -1)), "the polygons must not touch in the image"
        expected_depth = np.where(inside > 0, _plane_depth(camera, polygon), expected_depth)
        inside_any = np.maximum(inside_any, inside)
    covered = depth > 0
    assert np.all(covered[inside_any > MARGIN]), "pixels inside a projected polygon are empty in Cycles"
    assert not np.any(covered[inside_any < -MARGIN]), "pixels outside every projected polygon are covered"
    sure = inside_any > MARGIN
    assert sure.sum() > 500
    np.testing.assert_allclose(depth[sure], expected_depth[sure], rtol=1e-5, atol=1e-5)
