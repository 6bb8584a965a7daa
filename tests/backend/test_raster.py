import numpy as np
import pytest

from backend.geometry import raster
from backend.geometry.cameras import Camera, look_at
from backend.geometry.mesh import Mesh
from backend.geometry.raster import GRAZING_SIN, rasterize_uv, rasterize_view, uv_coverage_count
from backend.validation import InputError

QUAD_TRIANGLES = np.array([[0, 1, 2], [0, 2, 3]])
QUAD_UVS = np.array([[[0, 0], [1, 0], [1, 1]], [[0, 0], [1, 1], [0, 1]]], np.float32)


def quad(corners, uvs=QUAD_UVS) -> Mesh:
    """Two triangles over four corners given counter-clockwise."""
    return Mesh(np.asarray(corners, np.float32), QUAD_TRIANGLES, uvs)


def camera_space_quad(camera: Camera, x, y, z) -> Mesh:
    """A quad spanning camera-space [x0, x1] x [y0, y1] at planar depth z, in world coordinates."""
    local = np.array([[x[0], y[0], z], [x[1], y[0], z], [x[1], y[1], z], [x[0], y[1], z]])
    return quad(local @ camera.rotation.T + camera.center)


def box_room(size=(6.0, 5.0, 3.0)) -> Mesh:
    """An axis-aligned box [0, size] with each wall as just two triangles."""
    sx, sy, sz = size
    v = np.array([[x, y, z] for x in (0, sx) for y in (0, sy) for z in (0, sz)], np.float32)
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = [[a, b, c] for a, b, c, d in faces] + [[a, c, d] for a, b, c, d in faces]
    return Mesh(v, np.array(tris))


def box_depth(camera: Camera, size) -> np.ndarray:
    """Analytic planar depth of the nearest wall of the box [0, size] for every pixel."""
    d = camera.ray_directions()
    c = camera.center
    with np.errstate(divide="ignore"):
        t = np.where(d > 0, (np.asarray(size) - c) / d, -c / d)
    return np.where(np.abs(d) > 1e-12, t, np.inf).min(axis=-1)


def test_fronto_parallel_quad_has_its_distance_and_projected_footprint():
    pose = look_at([1.0, 2.0, 0.5], [4.0, -1.0, 1.5])
    K = np.array([[50.0, 0.0, 20.3], [0.0, 55.0, 14.6], [0.0, 0.0, 1.0]])
    cam = Camera(K, pose, 40, 30)
    mesh = camera_space_quad(cam, (-0.73, 0.41), (-0.35, 0.22), 2.5)
    r = rasterize_view(mesh, cam)
    xs, ys = np.arange(40), np.arange(30)
    inside_x = (xs > K[0, 2] + 50 * -0.73 / 2.5) & (xs < K[0, 2] + 50 * 0.41 / 2.5)
    inside_y = (ys > K[1, 2] + 55 * -0.35 / 2.5) & (ys < K[1, 2] + 55 * 0.22 / 2.5)
    expected = inside_y[:, None] & inside_x[None, :]
    np.testing.assert_array_equal(r.covered, expected)
    np.testing.assert_allclose(r.depth[expected], 2.5, rtol=1e-6)
    assert np.all(r.depth[~expected] == 0) and np.all(r.triangle[~expected] == -1)
    assert np.all(r.barycentric[~expected] == 0)


def test_tilted_plane_depth_matches_ray_plane_intersection():
    cam = Camera.from_fov(80.0, 48, 36, look_at([0.3, -0.2, 1.0], [5.0, 1.0, 0.2]))
    normal_cam = np.array([0.0, np.sin(np.radians(50)), -np.cos(np.radians(50))])
    point_cam = np.array([0.0, 0.0, 3.0])
    u = np.cross(normal_cam, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(normal_cam, u)
    local = point_cam + 4.0 * np.array([-u - v, u - v, u + v, -u + v])
    mesh = quad(local @ cam.rotation.T + cam.center)
    r = rasterize_view(mesh, cam)
    d_cam = cam.ray_directions() @ cam.rotation  # rows back in camera axes (unit z)
    expected = (point_cam @ normal_cam) / (d_cam @ normal_cam)
    hit = r.covered
    assert hit.mean() > 0.5
    np.testing.assert_allclose(r.depth[hit], expected[hit], rtol=1e-4)


@pytest.mark.parametrize("near_first", [True, False])
def test_near_quad_hides_far_quad_whatever_the_triangle_order(near_first):
    cam = Camera.from_fov(60.0, 32, 24)
    near = camera_space_quad(cam, (-0.2, 0.3), (-0.2, 0.2), 2.0)
    far = camera_space_quad(cam, (-3.0, 3.0), (-3.0, 3.0), 5.0)
    mesh = Mesh.concatenate([near, far] if near_first else [far, near])
    r = rasterize_view(mesh, cam)
    near_ids = {0, 1} if near_first else {2, 3}
    alone = rasterize_view(near, cam).covered
    assert alone.sum() > 20
    assert r.covered.all()
    np.testing.assert_allclose(r.depth[alone], 2.0, rtol=1e-6)
    np.testing.assert_allclose(r.depth[~alone], 5.0, rtol=1e-6)
    assert set(np.unique(r.triangle[alone])) <= near_ids
    assert not set(np.unique(r.triangle[~alone])) & near_ids


@pytest.mark.parametrize(
    "eye, target",
    [
        ([1.3, 3.7, 1.1], [6.0, 0.0, 0.0]),  # towards a corner
        ([3.0, 2.5, 1.5], [3.2, 2.6, 3.0]),  # steeply up
        ([0.02, 2.5, 1.5], [6.0, 2.5, 1.5]),  # back almost against a wall
        ([5.0, 1.0, 0.4], [2.0, 4.0, 0.3]),
    ],
)
def test_camera_inside_a_box_room_sees_walls_everywhere(eye, target):
    size = (6.0, 5.0, 3.0)
    cam = Camera.from_fov(110.0, 64, 48, look_at(eye, target))
    r = rasterize_view(box_room(size), cam)
    assert r.covered.all()
    np.testing.assert_allclose(r.depth, box_depth(cam, size), rtol=1e-4)


def test_rolled_camera_over_a_floor_that_extends_behind_it():
    # Rolled 45 degrees, the visible half of the floor has a diagonal horizon, so its screen box
    # is the whole image: pixels above the horizon look at the floor only backwards along the ray.
    floor = Mesh(np.array([[-1e3, -1e3, 0], [1e3, -1e3, 0], [0, 2e3, 0]], np.float32), [[0, 1, 2]])
    roll = np.radians(45)
    right, forward = np.array([np.cos(roll), 0, -np.sin(roll)]), np.array([0.0, 1.0, 0.0])
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = [0.0, 0.0, 1.0]
    cam = Camera.from_fov(90.0, 40, 40, pose)
    r = rasterize_view(floor, cam)
    d = cam.ray_directions()
    # The diagonal through the image centre looks exactly along the floor: whether its rays point
    # a rounding error up or down depends on the CPU, and the grazing rule makes them all miss.
    sine = d[..., 2] / np.linalg.norm(d, axis=-1)
    horizon = np.abs(sine) < GRAZING_SIN / 10
    sees_floor = sine < -10 * GRAZING_SIN
    assert horizon.sum() >= 38 and (horizon | sees_floor | (sine > 0)).all()
    assert 0.3 < sees_floor.mean() < 0.7
    np.testing.assert_array_equal(r.covered, sees_floor)
    np.testing.assert_allclose(r.depth[sees_floor], -1.0 / d[sees_floor][:, 2], rtol=1e-4)


def test_rays_along_a_plane_miss_it_and_rays_just_steeper_hit():
    # A camera a hair above a large floor, looking along it with a long lens: pixel row k below
    # the centre meets the floor at a sine of about k / focal, well inside the triangle.
    height, focal = 61, 1e8
    K = np.array([[focal, 0.0, 0.0], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    pose = np.eye(4)
    pose[:3, :3] = np.stack([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], axis=1)  # right x, down -z, forward y
    pose[:3, 3] = [0.0, 0.0, 1e-7]
    cam = Camera(K, pose, 1, height)
    floor = Mesh(np.array([[-100, -1, 0], [100, -1, 0], [0, 100, 0]], np.float32), [[0, 1, 2]])
    r = rasterize_view(floor, cam)
    d = cam.ray_directions()[:, 0]
    sine = -d[:, 2] / np.linalg.norm(d, axis=-1)
    reach = 1e-7 / np.where(sine > 0, sine, np.inf)  # distance to the floor; 10 or less below the centre
    assert reach.max() < 20
    steep, grazing = sine > 1.5 * GRAZING_SIN, np.abs(sine) < GRAZING_SIN / 1.5
    assert steep.sum() >= 10 and (grazing & (sine > 0)).sum() >= 3
    decided = steep | grazing | (sine < 0)
    assert decided.sum() >= height - 12
    np.testing.assert_array_equal(r.covered[decided, 0], steep[decided])
    np.testing.assert_allclose(r.depth[steep, 0], reach[steep] * np.linalg.norm(d[steep], axis=-1), rtol=1e-3)


def test_geometry_behind_the_camera_is_not_drawn():
    cam = Camera.from_fov(90.0, 16, 12)
    behind = camera_space_quad(cam, (-1.0, 1.0), (-1.0, 1.0), -2.0)
    r = rasterize_view(behind, cam)
    assert not r.covered.any() and np.all(r.depth == 0)


def test_triangles_seen_edge_on_draw_nothing():
    # With float32 vertices such planes miss the camera centre only by rounding, which would
    # otherwise decide the depth of the pixel row they pass through.
    rng = np.random.default_rng(5)
    for _ in range(20):
        eye = rng.uniform(-1.0, 1.0, size=3)
        cam = Camera.from_fov(90.0, 33, 33, look_at(eye, eye + rng.normal(size=3)))
        right, forward = cam.rotation[:, 0], cam.rotation[:, 2]
        corners = eye + np.array([forward - right, forward + right, 3.0 * forward])
        assert not rasterize_view(Mesh(corners.astype(np.float32), [[0, 1, 2]]), cam).covered.any()


def test_barycentrics_are_perspective_correct():
    mesh = box_room((4.0, 3.0, 2.5))
    rng = np.random.default_rng(3)
    for _ in range(3):
        eye = rng.uniform([0.5, 0.5, 0.5], [3.5, 2.5, 2.0])
        cam = Camera.from_fov(100.0, 48, 40, look_at(eye, eye + rng.normal(size=3)))
        r = rasterize_view(mesh, cam)
        assert r.covered.all()
        np.testing.assert_allclose(r.barycentric.sum(axis=-1), 1.0, atol=1e-5)
        assert r.barycentric.min() > -1e-5
        interpolated = r.interpolate(mesh.corners)
        np.testing.assert_allclose(interpolated, cam.unproject(r.depth), atol=1e-4 * r.depth.max())


def brute_force_depth(mesh: Mesh, camera: Camera) -> np.ndarray:
    """Nearest ray-triangle hit per pixel, every ray against every triangle (0 where none)."""
    d = camera.ray_directions().reshape(-1, 1, 3)
    c = mesh.corners.astype(np.float64)
    e1, e2, s = c[:, 1] - c[:, 0], c[:, 2] - c[:, 0], camera.center - c[:, 0]
    p = np.cross(d, e2)
    det = (p * e1).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (p * s).sum(-1) / det
        q = np.cross(s, e1)
        v = (d * q).sum(-1) / det
        t = (q * e2).sum(-1) / det
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-4)
    nearest = np.where(hit, t, np.inf).min(axis=1)
    return np.where(np.isfinite(nearest), nearest, 0.0).reshape(camera.height, camera.width)


def test_matches_brute_force_ray_casting_on_a_triangle_soup():
    rng = np.random.default_rng(11)
    centres = rng.uniform([0.5, 0.5, 0.3], [5.5, 4.5, 2.7], size=(150, 1, 3))
    soup = (centres + rng.normal(scale=0.4, size=(150, 3, 3))).astype(np.float32)
    mesh = Mesh.concatenate([box_room(), Mesh(soup.reshape(-1, 3), np.arange(450).reshape(150, 3))])
    for eye, target in (([0.2, 0.3, 1.5], [5.0, 4.0, 1.0]), ([3.0, 2.5, 1.4], [0.0, 2.0, 2.5])):
        cam = Camera.from_fov(95.0, 64, 48, look_at(eye, target))
        depth = rasterize_view(mesh, cam).depth
        expected = brute_force_depth(mesh, cam)
        assert expected.min() > 0
        agree = np.isclose(depth, expected, rtol=1e-5)
        assert agree.mean() > 0.999


def test_results_do_not_depend_on_chunking(monkeypatch):
    mesh = box_room()
    cam = Camera.from_fov(100.0, 40, 30, look_at([1.0, 1.0, 1.0], [5.0, 4.0, 2.0]))
    textured = quad([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    view, surface = rasterize_view(mesh, cam), rasterize_uv(textured, 64)
    monkeypatch.setattr(raster, "CHUNK_CANDIDATES", 97)
    small_view, small_surface = rasterize_view(mesh, cam), rasterize_uv(textured, 64)
    np.testing.assert_array_equal(small_view.depth, view.depth)
    np.testing.assert_array_equal(small_view.triangle, view.triangle)
    np.testing.assert_array_equal(small_surface.position, surface.position)
    assert surface.covered.all()


def random_uv_triangles(rng, cells=5):
    """One random triangle inside each cell of a grid, so none overlap."""
    tris = []
    for i in range(cells):
        for j in range(cells):
            corner = np.array([i, j]) / cells
            tris.append(corner + rng.uniform(0.0, 1.0 / cells, size=(3, 2)))
    return np.array(tris, np.float32)


def test_uv_coverage_matches_triangle_areas_and_centres():
    rng = np.random.default_rng(7)
    uvs = random_uv_triangles(rng)
    n = len(uvs)
    vertices = rng.normal(size=(3 * n, 3)).astype(np.float32)
    mesh = Mesh(vertices, np.arange(3 * n).reshape(n, 3), uvs)
    size = 128
    s = rasterize_uv(mesh, size)
    px = np.stack([uvs[..., 0] * size - 0.5, (1 - uvs[..., 1]) * size - 0.5], axis=-1).astype(np.float64)
    a, b = px[:, 1] - px[:, 0], px[:, 2] - px[:, 0]
    area = 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    perimeter = np.linalg.norm(px - np.roll(px, 1, axis=1), axis=-1).sum(axis=1)
    counts = np.bincount(s.triangle[s.covered], minlength=n)
    assert np.all(np.abs(counts - area) <= perimeter + 1)
    # Centres well inside a triangle are covered by it; centres well outside every one are not.
    jj, ii = np.meshgrid(np.arange(size), np.arange(size))
    p = np.stack([jj, ii], axis=-1).reshape(-1, 1, 2).astype(np.float64)
    det = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    rel = p - px[:, 0]
    l1 = (rel[..., 0] * b[:, 1] - rel[..., 1] * b[:, 0]) / det
    l2 = (a[:, 0] * rel[..., 1] - a[:, 1] * rel[..., 0]) / det
    margin = np.minimum(np.minimum(l1, l2), 1 - l1 - l2) * np.sqrt(area)
    inside = margin > 1e-3
    clearly = inside.any(axis=1)
    assert clearly.sum() > 1000
    np.testing.assert_array_equal(s.triangle.reshape(-1)[clearly], inside[clearly].argmax(axis=1))
    assert not s.covered.reshape(-1)[(margin < -1e-3).all(axis=1)].any()


def test_uv_positions_interpolate_linearly_and_row_zero_is_v_one():
    corners = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, 2.5], [-0.2, 0.8, 3.0]], np.float32)
    uvs = np.array([[[0.1, 0.55], [0.9, 0.6], [0.4, 0.95]]], np.float32)
    mesh = Mesh(corners, [[0, 1, 2]], uvs)
    size = 64
    s = rasterize_uv(mesh, size)
    assert s.covered.sum() > 200
    assert not s.covered[size // 2 :].any()  # v < 0.5 is the bottom half of the image
    i, j = np.nonzero(s.covered)
    uv = np.stack([(j + 0.5) / size, 1 - (i + 0.5) / size], axis=1)
    m = np.stack([uvs[0, 1] - uvs[0, 0], uvs[0, 2] - uvs[0, 0]], axis=1)
    l12 = np.linalg.solve(m, (uv - uvs[0, 0]).T).T
    expected = corners[0] + l12[:, :1] * (corners[1] - corners[0]) + l12[:, 1:] * (corners[2] - corners[0])
    np.testing.assert_allclose(s.position[i, j], expected, atol=1e-4)
    np.testing.assert_allclose(s.normal[s.covered], np.broadcast_to(mesh.face_normals()[0], (len(i), 3)), atol=1e-6)
    assert np.all(s.position[~s.covered] == 0) and np.all(s.triangle[~s.covered] == -1)


def test_uv_normals_follow_the_winding():
    flat = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    up = rasterize_uv(quad(flat), 16)
    down = rasterize_uv(Mesh(np.array(flat, np.float32), QUAD_TRIANGLES[:, ::-1], QUAD_UVS[:, ::-1]), 16)
    assert up.covered.all() and down.covered.all()
    np.testing.assert_allclose(up.normal.reshape(-1, 3), np.tile([0, 0, 1], (256, 1)), atol=1e-6)
    np.testing.assert_allclose(down.normal.reshape(-1, 3), np.tile([0, 0, -1], (256, 1)), atol=1e-6)


def test_uv_coverage_count_finds_overlaps_but_not_shared_edges():
    flat = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    assert uv_coverage_count(quad(flat), 32).max() == 1
    stacked = Mesh.concatenate([quad(flat), quad(flat + [0, 0, 1])])
    counts = uv_coverage_count(stacked, 32)
    assert counts.max() == 2 and (counts == 2).mean() > 0.9


def test_invalid_inputs_name_the_field():
    no_uvs = Mesh(np.eye(3, dtype=np.float32), [[0, 1, 2]])
    with pytest.raises(InputError) as err:
        rasterize_uv(no_uvs, 64)
    assert err.value.field == "mesh"
    with_uvs = quad([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    for bad in (0, -4, 2.5, True, raster.MAX_ATLAS_SIZE + 1):
        with pytest.raises(InputError) as err:
            rasterize_uv(with_uvs, bad)
        assert err.value.field == "size"
    with pytest.raises(InputError) as err:
        rasterize_view(with_uvs, "camera")
    assert err.value.field == "camera"
    with pytest.raises(InputError) as err:
        rasterize_view(with_uvs, Camera.from_fov(60.0, 8, 8), near=0.0)
    assert err.value.field == "near"
