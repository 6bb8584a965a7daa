import os

import numpy as np
import pytest

from backend.geometry.child import ChildFailed
from backend.geometry.mesh import Mesh
from backend.geometry.raster import rasterize_uv, uv_coverage_count
from backend.geometry.uv_atlas import ensure_uvs
from backend.scenes.shapes import icosphere
from backend.validation import InputError


def cube(offset=(0.0, 0.0, 0.0), size=1.0) -> Mesh:
    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float32) * size + offset
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = [[a, b, c] for a, b, c, d in faces] + [[a, c, d] for a, b, c, d in faces]
    return Mesh(v, np.array(tris))


def sphere(rings: int, segments: int) -> Mesh:
    """A closed UV sphere with shared vertices (one per pole), 2 * segments * (rings - 1) triangles."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]).astype(np.float32)
    south = len(vertices) - 1
    j = np.arange(segments)
    idx = lambda i, k: 1 + i * segments + k % segments  # noqa: E731
    tris = [np.stack([np.zeros(segments, int), idx(0, j), idx(0, j + 1)], axis=1)]
    for i in range(rings - 2):
        tris.append(np.stack([idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)], axis=1))
        tris.append(np.stack([idx(i, j), idx(i + 1, j + 1), idx(i, j + 1)], axis=1))
    tris.append(np.stack([np.full(segments, south), idx(rings - 2, j + 1), idx(rings - 2, j)], axis=1))
    return Mesh(vertices, np.concatenate(tris))


def corner_angles(points: np.ndarray) -> np.ndarray:
    """Interior angles (M, 3) of triangles given as (M, 3, D) corner coordinates."""
    a = np.roll(points, -1, axis=1) - points
    b = np.roll(points, 1, axis=1) - points
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def chart_gap_violations(chart: np.ndarray, padding: int) -> int:
    """Texel pairs of different charts closer than ``padding`` empty texels (Chebyshev)."""
    size = chart.shape[0]
    bad = 0
    for dy in range(-padding, padding + 1):
        for dx in range(-padding, padding + 1):
            shifted = np.full_like(chart, -1)
            shifted[max(-dy, 0) : size - max(dy, 0), max(-dx, 0) : size - max(dx, 0)] = chart[
                max(dy, 0) : size - max(-dy, 0), max(dx, 0) : size - max(-dx, 0)
            ]
            bad += int(np.sum((chart >= 0) & (shifted >= 0) & (chart != shifted)))
    return bad


def check_unwrap(mesh: Mesh, resolution: int, padding: int):
    atlas = ensure_uvs(mesh, resolution=resolution, padding=padding)
    assert atlas.unwrapped and atlas.chart_ids is not None
    out = atlas.mesh
    np.testing.assert_array_equal(out.vertices, mesh.vertices)
    np.testing.assert_array_equal(out.triangles, mesh.triangles)
    np.testing.assert_array_equal(out.object_ids, mesh.object_ids)
    assert out.uvs.shape == (len(mesh.triangles), 3, 2)
    assert out.uvs.min() >= 0.0 and out.uvs.max() <= 1.0
    texels = out.uvs.astype(np.float64) * resolution
    a, b = texels[:, 1] - texels[:, 0], texels[:, 2] - texels[:, 0]
    uv_area = 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    assert uv_area.min() > 0.05  # every triangle gets a usable patch of texels
    assert np.all(atlas.chart_ids >= 0)
    # The UVs belong to their own triangle: UV triangles are near-similar to the 3D ones.
    assert np.median(np.abs(corner_angles(texels) - corner_angles(mesh.corners.astype(np.float64)))) < 1.0
    assert uv_coverage_count(out, resolution).max() == 1  # no overlapping charts
    surface = rasterize_uv(out, resolution)
    chart = np.where(surface.covered, atlas.chart_ids[surface.triangle], -1)
    assert chart_gap_violations(chart, padding) == 0
    return atlas, surface


def assert_undistorted_with_uniform_density(atlas, mesh: Mesh, resolution: int):
    """Flat faces keep their shape, and every object gets the same texels per unit area."""
    texels = atlas.mesh.uvs.astype(np.float64) * resolution
    np.testing.assert_allclose(corner_angles(texels), corner_angles(mesh.corners.astype(np.float64)), atol=0.05)
    a, b = texels[:, 1] - texels[:, 0], texels[:, 2] - texels[:, 0]
    density = 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / mesh.areas()
    np.testing.assert_allclose(density, np.median(density), rtol=0.01)


def test_cube_unwraps_into_separate_padded_charts():
    mesh = cube()
    atlas, surface = check_unwrap(mesh, 128, 4)
    assert atlas.chart_ids.max() + 1 >= 2
    assert surface.covered.mean() > 0.2
    assert_undistorted_with_uniform_density(atlas, mesh, 128)


def test_sphere_unwraps_without_overlaps_or_degenerate_uvs():
    mesh = sphere(rings=32, segments=48)
    assert 2000 <= len(mesh.triangles) <= 5000
    check_unwrap(mesh, 512, 3)


def test_objects_share_one_atlas():
    mesh = Mesh.concatenate([cube(), cube(offset=(3.0, 0.0, 0.0), size=2.0)])
    atlas, surface = check_unwrap(mesh, 128, 2)
    assert_undistorted_with_uniform_density(atlas, mesh, 128)
    seen_objects = np.unique(atlas.mesh.object_ids[surface.triangle[surface.covered]])
    np.testing.assert_array_equal(seen_objects, [0, 1])


def test_existing_uvs_are_kept_untouched():
    mesh = cube()
    uvs = np.random.default_rng(1).uniform(0.0, 1.0, size=(len(mesh.triangles), 3, 2)).astype(np.float32)
    textured = mesh.with_uvs(uvs)
    atlas = ensure_uvs(textured)
    assert not atlas.unwrapped and atlas.chart_ids is None
    np.testing.assert_array_equal(atlas.mesh.uvs, uvs)
    assert atlas.mesh is textured


def test_degenerate_triangles_do_not_break_the_unwrap():
    base = cube()
    vertices = np.concatenate([base.vertices, [[5, 5, 5], [6, 5, 5], [7, 5, 5]]]).astype(np.float32)
    mesh = Mesh(vertices, np.concatenate([base.triangles, [[8, 9, 10]]]))
    atlas = ensure_uvs(mesh, resolution=64, padding=2)
    assert atlas.mesh.uvs.shape == (13, 3, 2)
    assert atlas.chart_ids[-1] == -1 and np.all(atlas.chart_ids[:-1] >= 0)
    np.testing.assert_array_equal(atlas.mesh.triangles, mesh.triangles)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"resolution": 0}, "resolution"),
        ({"resolution": 10, "padding": 4}, "resolution"),
        ({"padding": -1}, "padding"),
        ({"padding": 1.5}, "padding"),
    ],
)
def test_invalid_inputs_name_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        ensure_uvs(cube(), **kwargs)
    assert err.value.field == field


def test_non_mesh_is_rejected():
    with pytest.raises(InputError) as err:
        ensure_uvs(np.zeros((3, 3)))
    assert err.value.field == "mesh"


def test_charts_that_cannot_fit_raise_the_resolution_error_from_the_child_process():
    # The unwrap runs in a child process; its InputError comes back with the same field, which
    # the texturing job relies on to retry with a narrower gutter.
    mesh = Mesh.concatenate([cube(offset=(3.0 * k, 0.0, 0.0)) for k in range(40)])
    with pytest.raises(InputError) as err:
        ensure_uvs(mesh, resolution=16, padding=4)
    assert err.value.field == "resolution"


def test_an_unwrap_past_its_time_limit_is_stopped_with_a_clear_error():
    vertices, triangles = icosphere([0.0, 0.0, 0.0], 1.0, 4)
    with pytest.raises(ChildFailed, match="did not finish within its time limit"):
        ensure_uvs(Mesh(vertices, triangles), 512, 2, time_limit=0.0)


def test_a_cancel_check_stops_the_unwrap_where_it_raises():
    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    vertices, triangles = icosphere([0.0, 0.0, 0.0], 1.0, 4)
    with pytest.raises(Stop):
        ensure_uvs(Mesh(vertices, triangles), 512, 2, check=check)
    assert len(calls) == 3


def test_unwrap_progress_comes_from_the_child_process():
    steps = []
    atlas = ensure_uvs(cube(), 128, 4, progress=lambda step, total: steps.append((step, total)))
    assert steps and steps[0][0] == 1 and all(step <= total for step, total in steps)
    assert atlas.unwrap_peak_bytes > 2**20 or not os.path.exists("/proc/self/status")  # the child's peak memory
    assert [step for step, _ in steps] == sorted(step for step, _ in steps)


def bumpy_quad_torus(rings: int = 32, sides: int = 16, bumps: float = 0.02) -> tuple[Mesh, int]:
    """A torus of non-planar quads, each split into triangles k and k + quads; returns it and the quad count."""
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, rings, endpoint=False),
                       np.linspace(0, 2 * np.pi, sides, endpoint=False), indexing="ij")
    vertices = np.stack([(1 + 0.35 * np.cos(v)) * np.cos(u), (1 + 0.35 * np.cos(v)) * np.sin(u), 0.35 * np.sin(v)], -1)
    vertices = vertices.reshape(-1, 3) + np.random.default_rng(0).normal(0.0, bumps, (rings * sides, 3))
    index = np.arange(rings * sides).reshape(rings, sides)
    a, b = index.ravel(), np.roll(index, -1, 0).ravel()
    c, d = np.roll(np.roll(index, -1, 0), -1, 1).ravel(), np.roll(index, -1, 1).ravel()
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return Mesh(vertices, triangles, polygon_ids=np.tile(np.arange(len(a)), 2)), len(a)


def test_every_quad_stays_whole_in_one_chart_when_polygons_are_given():
    # Blender keeps one UV per quad corner: a seam along a quad's diagonal would stretch one half
    # across the atlas once both halves are written to the same corners.
    mesh, quads = bumpy_quad_torus()
    triangles_only = ensure_uvs(Mesh(mesh.vertices, mesh.triangles), 512, 4)
    assert np.count_nonzero(triangles_only.chart_ids[:quads] != triangles_only.chart_ids[quads:]) > 0

    atlas, surface = check_unwrap(mesh, 512, 4)
    np.testing.assert_array_equal(atlas.chart_ids[:quads], atlas.chart_ids[quads:])
    uvs = atlas.mesh.uvs
    # Triangles (a, b, c) and (a, c, d) share the diagonal a-c: the same UVs on both sides.
    np.testing.assert_array_equal(uvs[:quads, 0], uvs[quads:, 0])
    np.testing.assert_array_equal(uvs[:quads, 2], uvs[quads:, 1])
    assert atlas.mesh.polygon_ids is not None


def test_polygon_ids_are_validated():
    mesh = cube()
    with pytest.raises(InputError) as err:
        Mesh(mesh.vertices, mesh.triangles, polygon_ids=np.arange(len(mesh.triangles) - 1))
    assert err.value.field == "polygon_ids"
    with pytest.raises(InputError) as err:
        Mesh(mesh.vertices, mesh.triangles, polygon_ids=-np.ones(len(mesh.triangles)))
    assert err.value.field == "polygon_ids"
    with pytest.raises(InputError, match="one object") as err:
        Mesh(mesh.vertices, mesh.triangles, object_ids=np.arange(len(mesh.triangles)) % 2,
             polygon_ids=np.zeros(len(mesh.triangles)))
    merged = Mesh.concatenate([Mesh(mesh.vertices, mesh.triangles, polygon_ids=np.arange(12) // 2)] * 2)
    np.testing.assert_array_equal(merged.polygon_ids, np.arange(24) // 2)
