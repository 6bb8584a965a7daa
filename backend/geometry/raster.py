"""Vectorised software rasterisation of meshes into camera views and into UV atlases.

Both entry points share one scheme. Every triangle gets a conservative integer box of pixel
centres; all (triangle, pixel) candidates of a bounded chunk of boxes are enumerated at once;
coverage is decided with barycentrics that are affine (UV) or projective (view) in the pixel
offset from the box corner. Evaluating relative to the corner keeps float32 precise even in
8k atlases, and chunking bounds memory whatever the triangle sizes are.

In views the barycentrics come from intersecting each pixel's ray with the triangle's plane
rather than from projected vertices, so triangles that cross the camera plane (the walls of a
room seen from inside) need no clipping: only their screen box is taken from the part in front
of the near plane. Back faces are kept, since rooms are seen from inside. Rays that run along a
triangle's plane (see :data:`GRAZING_SIN`) miss it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..validation import InputError, in_range, positive_int
from .cameras import NEAR, Camera, pixel_grid
from .mesh import Mesh

MAX_ATLAS_SIZE = 8192  # 8k texels square already need about 2 GB for the surface maps
CHUNK_CANDIDATES = 1 << 21
VIEW_EDGE_EPS = 1e-6
UV_EDGE_EPS = 1e-5
GRAZING_SIN = 1e-7
"""A ray misses a triangle whose plane it meets at an angle with a smaller sine.

Such a ray runs along the plane: where it meets it is decided by rounding alone (a floor seen
exactly at its horizon, a wall seen edge-on), so it counts as a miss on every CPU.
"""
BOX_MARGIN = 1e-3  # pixels: a centre on a shared vertex must land in the boxes of both sides


@dataclass(frozen=True, eq=False)
class ViewRaster:
    """Per-pixel visible surface of a view.

    ``depth`` float32 (H, W) planar z, 0 where nothing was hit; ``triangle`` int32 (H, W), -1 for
    background; ``barycentric`` float32 (H, W, 3), perspective-correct weights of the visible
    triangle's corners (0 for background).
    """

    depth: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray

    @property
    def covered(self) -> np.ndarray:
        return self.triangle >= 0

    def interpolate(self, corner_values: np.ndarray) -> np.ndarray:
        """Interpolate per-corner values (M, 3) or (M, 3, C) at every pixel; 0 for background."""
        values = np.asarray(corner_values)
        if values.ndim not in (2, 3) or values.shape[1] != 3:
            raise InputError("corner_values", f"expected shape (M, 3) or (M, 3, C), got {values.shape}")
        squeeze = values.ndim == 2
        if squeeze:
            values = values[..., None]
        out = np.zeros(self.triangle.shape + values.shape[2:], np.float32)
        hit = self.covered
        tri = self.triangle[hit]
        if len(tri) and tri.max() >= len(values):
            raise InputError("corner_values", f"has {len(values)} triangles, the raster refers to {tri.max() + 1}")
        weights = self.barycentric[hit]
        out[hit] = np.einsum("nk,nkc->nc", weights, values[tri].astype(np.float32))
        return out[..., 0] if squeeze else out


@dataclass(frozen=True, eq=False)
class TexelSurface:
    """The surface behind every texel of a square UV atlas (row 0 = top = v 1).

    ``position`` float32 (S, S, 3) world position at the texel centre; ``normal`` float32
    (S, S, 3) unit geometric face normal from the winding; ``triangle`` int32 (S, S), -1 where no
    UV triangle covers the centre; ``covered`` bool (S, S). Uncovered texels hold zeros.
    """

    position: np.ndarray
    normal: np.ndarray
    triangle: np.ndarray
    covered: np.ndarray

    @property
    def size(self) -> int:
        return self.triangle.shape[0]


# ---------------------------------------------------------------------- shared candidate machinery
@dataclass(frozen=True)
class _Boxes:
    """Non-empty pixel boxes: ``triangle`` they belong to, corner ``x0``/``y0``, size ``w``/``h``."""

    triangle: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    w: np.ndarray
    h: np.ndarray


def _pixel_boxes(lo: np.ndarray, hi: np.ndarray, width: int, height: int) -> _Boxes:
    """Integer boxes of pixel centres inside float bounds (T, 2) as (x, y), clamped to the image."""
    lo = np.clip(lo - BOX_MARGIN, -1.0, [width, height])
    hi = np.clip(hi + BOX_MARGIN, -1.0, [width, height])
    first = np.maximum(np.ceil(lo), 0).astype(np.int64)
    last = np.minimum(np.floor(hi), [width - 1, height - 1]).astype(np.int64)
    size = last - first + 1
    keep = np.flatnonzero((size[:, 0] > 0) & (size[:, 1] > 0))
    return _Boxes(keep, first[keep, 0], first[keep, 1], size[keep, 0], size[keep, 1])


def _candidate_chunks(w: np.ndarray, h: np.ndarray) -> Iterator[tuple]:
    """Yield ``(box, dx, dy)`` for every pixel of every box, about ``CHUNK_CANDIDATES`` at a time.

    Boxes larger than the budget are cut into bands of rows so one huge triangle cannot blow up
    memory; ``dx``/``dy`` stay relative to the whole box's corner.
    """
    if len(w) == 0:
        return
    budget = CHUNK_CANDIDATES
    rows = np.maximum(1, budget // w)
    bands = -(-h // rows)
    band_box = np.repeat(np.arange(len(w)), bands)
    band_index = np.arange(len(band_box)) - np.repeat(np.cumsum(bands) - bands, bands)
    band_row0 = band_index * rows[band_box]
    band_h = np.minimum(rows[band_box], h[band_box] - band_row0)
    counts = w[band_box] * band_h
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
        count = counts[start:stop]
        total = int(count.sum())
        offsets = np.repeat(np.cumsum(count) - count, count).astype(np.int32)
        local = np.arange(total, dtype=np.int32) - offsets
        width = np.repeat(w[band_box[start:stop]].astype(np.int32), count)
        dy = local // width
        dx = local - dy * width
        dy += np.repeat(band_row0[start:stop].astype(np.int32), count)
        yield np.repeat(band_box[start:stop].astype(np.int32), count), dx, dy
        start = stop


def _affine_at(coeffs: np.ndarray, box: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Evaluate per-box affine forms ``c + a*dx + b*dy``; coeffs (B, 3) as (c, a, b)."""
    c = coeffs[box]
    return c[:, 0] + c[:, 1] * dx + c[:, 2] * dy


# ---------------------------------------------------------------------- views
def rasterize_view(mesh: Mesh, camera: Camera, near: float = NEAR) -> ViewRaster:
    """Nearest surface per pixel (pixel centres at integer coordinates), z-buffered, no culling.

    Only hits at planar depth > ``near`` count, so a camera standing inside geometry still sees
    what lies in front of it.
    """
    if not isinstance(mesh, Mesh):
        raise InputError("mesh", f"must be a Mesh, got {type(mesh).__name__}")
    if not isinstance(camera, Camera):
        raise InputError("camera", f"must be a Camera, got {type(camera).__name__}")
    if in_range("near", near, 0.0, np.inf) == 0.0:
        raise InputError("near", "must be > 0")
    W, H = camera.width, camera.height
    world_to_cam = camera.world_to_cam
    p = mesh.corners.astype(np.float64) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    boxes = _pixel_boxes(*_screen_bounds(p, camera.K, near), W, H)
    K_inv = np.linalg.inv(camera.K)
    det_c, u_c, v_c, t_num, normal_norm = _ray_forms(p[boxes.triangle], K_inv, boxes)
    ray_norm = np.linalg.norm(pixel_rays(K_inv, W, H), axis=-1).ravel()

    zbuf = np.full(H * W, np.inf)
    tri_map = np.full(H * W, -1, np.int32)
    bary = np.zeros((H * W, 2), np.float64)
    for box, dx, dy in _candidate_chunks(boxes.w, boxes.h):
        det = _affine_at(det_c, box, dx, dy)
        flat = (boxes.y0[box] + dy) * W + boxes.x0[box] + dx
        grazing = GRAZING_SIN * normal_norm[box] * ray_norm[flat]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / det
            t = t_num[box] * inv
            u = _affine_at(u_c, box, dx, dy) * inv
            v = _affine_at(v_c, box, dx, dy) * inv
            hit = (np.abs(det) > grazing) & (t > near) & (u >= -VIEW_EDGE_EPS) & (v >= -VIEW_EDGE_EPS)
            hit &= u + v <= 1.0 + VIEW_EDGE_EPS
        idx = np.flatnonzero(hit)
        box, t, u, v, flat = box[idx], t[idx], u[idx], v[idx], flat[idx]
        order = np.lexsort((t, flat))
        first = np.ones(len(order), bool)
        first[1:] = flat[order[1:]] != flat[order[:-1]]
        win = order[first]
        win = win[t[win] < zbuf[flat[win]]]
        target = flat[win]
        zbuf[target] = t[win]
        tri_map[target] = boxes.triangle[box[win]]
        bary[target, 0] = u[win]
        bary[target, 1] = v[win]

    covered = tri_map >= 0
    depth = np.where(covered, zbuf, 0.0).astype(np.float32)
    weights = np.zeros((H * W, 3), np.float32)
    weights[covered, 0] = 1.0 - bary[covered].sum(axis=1)
    weights[covered, 1:] = bary[covered]
    return ViewRaster(depth.reshape(H, W), tri_map.reshape(H, W), weights.reshape(H, W, 3))


def _screen_bounds(p: np.ndarray, K: np.ndarray, near: float) -> tuple[np.ndarray, np.ndarray]:
    """Screen bounds (T, 2) of each camera-space triangle's part in front of the near plane.

    That part is a convex polygon whose corners are the vertices in front plus the points where
    edges cross the near plane, so its projection's box bounds every pixel that can see it.
    """
    a, b = p, np.roll(p, -1, axis=1)
    za, zb = a[..., 2] - near, b[..., 2] - near
    crosses = za * zb < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(crosses, za / (za - zb), 0.0)
    cut = a + s[..., None] * (b - a)
    cut[..., 2] = near
    points = np.concatenate([p, cut], axis=1)
    valid = np.concatenate([za > 0, crosses], axis=1)
    z = np.where(valid, points[..., 2], 1.0)
    xy = (points @ K.T)[..., :2] / z[..., None]
    lo = np.where(valid[..., None], xy, np.inf).min(axis=1)
    hi = np.where(valid[..., None], xy, -np.inf).max(axis=1)
    return lo, hi


def _ray_forms(p: np.ndarray, K_inv: np.ndarray, boxes: _Boxes) -> tuple[np.ndarray, ...]:
    """Affine forms in pixel offsets for a ray-plane (Moller-Trumbore) test per box.

    With ray direction ``d = K^-1 (x, y, 1)`` (unit camera z, so the ray parameter is planar
    depth), the determinant and the numerators of u and v are linear in ``d``, hence affine in
    the pixel; the depth numerator is constant per triangle. The last value is the length of
    each triangle's normal: the determinant over it and the ray's length is the sine that
    :data:`GRAZING_SIN` bounds.
    """
    e1, e2, s = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], -p[:, 0]
    q = np.cross(s, e1)
    normal = np.cross(e2, e1)
    forms = []
    for vector in (normal, np.cross(e2, s), q):
        g = vector @ K_inv  # row i: gradient of d . vector w.r.t. (x, y, 1)
        corner = g[:, 0] * boxes.x0 + g[:, 1] * boxes.y0 + g[:, 2]
        forms.append(np.stack([corner, g[:, 0], g[:, 1]], axis=1))
    t_num = np.einsum("ij,ij->i", e2, q)
    return forms[0], forms[1], forms[2], t_num, np.linalg.norm(normal, axis=1)


def pixel_rays(K_inv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-space ray ``K^-1 (x, y, 1)`` through every pixel centre, float64 (H, W, 3)."""
    xy = pixel_grid(width, height)
    return np.concatenate([xy, np.ones(xy.shape[:-1] + (1,))], axis=-1) @ K_inv.T



# ---------------------------------------------------------------------- UV atlases
def rasterize_uv(mesh: Mesh, size: int, check: Callable[[], None] | None = None) -> TexelSurface:
    """World position and face normal behind every texel centre of a ``size`` x ``size`` atlas.

    Texel (row i, col j) has its centre at u = (j + 0.5) / size, v = 1 - (i + 0.5) / size. Where
    UV triangles overlap any one of them wins. ``check`` runs before every chunk of candidates
    (raise to stop: an 8k atlas takes many seconds).
    """
    size = _check_uv_inputs(mesh, size)
    n = size * size
    tri_map = np.full(n, -1, np.int32)
    position = np.zeros((n, 3), np.float32)
    normal = np.zeros((n, 3), np.float32)
    winner = np.empty(n, np.int32)
    corners = mesh.corners.astype(np.float32)
    origin, e1, e2 = corners[:, 0], corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    face_normals = mesh.face_normals().astype(np.float32)
    for tri, flat, l1, l2 in _uv_hits(mesh, size, UV_EDGE_EPS):
        if check is not None:
            check()
        ids = np.arange(len(flat), dtype=np.int32)
        winner[flat] = ids
        keep = winner[flat] == ids
        tri, flat, l1, l2 = tri[keep], flat[keep], l1[keep], l2[keep]
        tri_map[flat] = tri
        position[flat] = origin[tri] + l1[:, None] * e1[tri] + l2[:, None] * e2[tri]
        normal[flat] = face_normals[tri]
    covered = tri_map >= 0
    return TexelSurface(
        position.reshape(size, size, 3), normal.reshape(size, size, 3),
        tri_map.reshape(size, size), covered.reshape(size, size),
    )


def uv_coverage_count(mesh: Mesh, size: int) -> np.ndarray:
    """How many UV triangles strictly contain each texel centre, int32 (size, size).

    Counts above 1 mean overlapping UVs (stacked or mirrored islands), which a bake cannot
    honour: one texel would have to show two surfaces. Centres on shared edges count once.
    """
    size = _check_uv_inputs(mesh, size)
    count = np.zeros(size * size, np.int64)
    for _, flat, _, _ in _uv_hits(mesh, size, -UV_EDGE_EPS):
        count += np.bincount(flat, minlength=size * size)
    return count.astype(np.int32).reshape(size, size)


def _check_uv_inputs(mesh: Mesh, size: int) -> int:
    if not isinstance(mesh, Mesh):
        raise InputError("mesh", f"must be a Mesh, got {type(mesh).__name__}")
    if mesh.uvs is None:
        raise InputError("mesh", "has no UVs; unwrap it first (uv_atlas.ensure_uvs)")
    size = positive_int("size", size)
    if size > MAX_ATLAS_SIZE:
        raise InputError("size", f"must be <= {MAX_ATLAS_SIZE}, got {size}")
    return size


def _uv_hits(mesh: Mesh, size: int, eps: float) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield ``(triangle, flat texel index, l1, l2)`` for texel centres inside UV triangles.

    A centre counts when every barycentric is >= -eps, so a positive eps closes the seams
    between neighbouring triangles and a negative one tests the strict interior.
    """
    # Texel-centre coordinates: centres of row i / column j sit at integer (x, y) = (j, i).
    q = np.empty(mesh.uvs.shape, np.float64)
    q[..., 0] = mesh.uvs[..., 0].astype(np.float64) * size - 0.5
    q[..., 1] = (1.0 - mesh.uvs[..., 1].astype(np.float64)) * size - 0.5
    boxes = _pixel_boxes(q.min(axis=1), q.max(axis=1), size, size)
    q = q[boxes.triangle]
    a, b = q[:, 1] - q[:, 0], q[:, 2] - q[:, 0]
    det = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    solid = np.abs(det) > 1e-12
    det = np.where(solid, det, 1.0)
    # (l1, l2) = M^-1 (p - q0) with M = [a b]; rows of M^-1 are the gradients.
    grad1 = np.stack([b[:, 1], -b[:, 0]], axis=1) / det[:, None]
    grad2 = np.stack([-a[:, 1], a[:, 0]], axis=1) / det[:, None]
    rel = np.stack([boxes.x0, boxes.y0], axis=1) - q[:, 0]
    forms = [
        np.stack([np.einsum("ij,ij->i", g, rel), g[:, 0], g[:, 1]], axis=1).astype(np.float32)
        for g in (grad1, grad2)
    ]
    forms[0][~solid] = -1.0  # degenerate UV triangles cover nothing
    x0, y0 = boxes.x0.astype(np.int32), boxes.y0.astype(np.int32)
    triangle = boxes.triangle.astype(np.int32)
    low = np.float32(-eps)
    high = np.float32(1.0 + eps)
    for box, dx, dy in _candidate_chunks(boxes.w, boxes.h):
        fdx, fdy = dx.astype(np.float32), dy.astype(np.float32)
        l1 = _affine_at(forms[0], box, fdx, fdy)
        l2 = _affine_at(forms[1], box, fdx, fdy)
        idx = np.flatnonzero((l1 >= low) & (l2 >= low) & (l1 + l2 <= high))
        box = box[idx]
        flat = (y0[box] + dy[idx]) * size + x0[box] + dx[idx]
        yield triangle[box], flat, l1[idx], l2[idx]
