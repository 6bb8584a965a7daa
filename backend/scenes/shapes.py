"""Mesh primitives built directly in numpy (no Blender), oriented by construction.

Every primitive returns ``(vertices, triangles)``. Orientation is fixed afterwards by
:func:`orient`, which makes each triangle face away from (or towards) a reference point: that
is exact for the convex primitives here and saves hand-checking windings face by face.
"""

from __future__ import annotations

import numpy as np


def grid(origin: np.ndarray, axis_u: np.ndarray, axis_v: np.ndarray, cells_u: int, cells_v: int):
    """A planar grid of quads spanning ``origin + s * axis_u + t * axis_v`` for s, t in [0, 1]."""
    s, t = np.meshgrid(np.linspace(0, 1, cells_u + 1), np.linspace(0, 1, cells_v + 1), indexing="ij")
    vertices = origin + s[..., None] * axis_u + t[..., None] * axis_v
    index = np.arange((cells_u + 1) * (cells_v + 1)).reshape(cells_u + 1, cells_v + 1)
    a, b = index[:-1, :-1].ravel(), index[1:, :-1].ravel()
    c, d = index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return vertices.reshape(-1, 3), triangles


def box(center, size, cell: float | None = None):
    """An axis-aligned box; ``cell`` subdivides faces into squares of about that size."""
    center, size = np.asarray(center, float), np.asarray(size, float)
    low = center - size / 2
    parts = []
    for axis in range(3):
        u_axis, v_axis = (axis + 1) % 3, (axis + 2) % 3
        for side in (0.0, 1.0):
            origin = low.copy()
            origin[axis] += side * size[axis]
            eu, ev = np.zeros(3), np.zeros(3)
            eu[u_axis], ev[v_axis] = size[u_axis], size[v_axis]
            nu = 1 if cell is None else max(1, round(size[u_axis] / cell))
            nv = 1 if cell is None else max(1, round(size[v_axis] / cell))
            parts.append(grid(origin, eu, ev, nu, nv))
    return merge(parts)


def cylinder(base_center, radius: float, height: float, segments: int = 32):
    """A capped vertical cylinder standing on ``base_center``."""
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.stack([radius * np.cos(angle), radius * np.sin(angle), np.zeros(segments)], 1)
    base = np.asarray(base_center, float)
    bottom, top = base + ring, base + ring + [0, 0, height]
    vertices = np.concatenate([bottom, top, [base, base + [0, 0, height]]])
    i = np.arange(segments)
    j = (i + 1) % segments
    side = np.concatenate([np.stack([i, j, j + segments], 1), np.stack([i, j + segments, i + segments], 1)])
    caps = np.concatenate([
        np.stack([np.full(segments, 2 * segments), j, i], 1),
        np.stack([np.full(segments, 2 * segments + 1), i + segments, j + segments], 1),
    ])
    return vertices, np.concatenate([side, caps])


def uv_sphere(center, radius: float, rings: int = 16, segments: int = 32):
    """A latitude-longitude sphere (poles as single vertices)."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    body = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    vertices = np.asarray(center, float) + radius * np.concatenate([[[0, 0, 1]], body, [[0, 0, -1]]])
    index = 1 + np.arange((rings - 1) * segments).reshape(rings - 1, segments)
    nxt = np.roll(index, -1, axis=1)
    quads_a = np.stack([index[:-1], index[1:], nxt[1:]], -1).reshape(-1, 3)
    quads_b = np.stack([index[:-1], nxt[1:], nxt[:-1]], -1).reshape(-1, 3)
    top = np.stack([np.zeros(segments, int), index[0], nxt[0]], 1)
    last = len(vertices) - 1
    bottom = np.stack([np.full(segments, last), nxt[-1], index[-1]], 1)
    return vertices, np.concatenate([quads_a, quads_b, top, bottom])


def icosphere(center, radius: float, subdivisions: int = 2):
    """A geodesic sphere: an icosahedron whose triangles are split in four ``subdivisions`` times.

    It has ``20 * 4 ** subdivisions`` triangles of nearly equal size, so it stands for dense
    scanned or sculpted meshes (6 subdivisions: 82k triangles, 8: 1.3 M).
    """
    g = (1 + 5**0.5) / 2
    vertices = np.array([[-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0], [0, -1, g], [0, 1, g],
                         [0, -1, -g], [0, 1, -g], [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1]], float)
    triangles = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                          [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                          [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    for _ in range(subdivisions):
        edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
        unique, inverse = np.unique(edges, axis=0, return_inverse=True)
        mid = len(vertices) + inverse.reshape(3, -1)  # midpoints of edges 01, 12, 20 of every triangle
        vertices = np.concatenate([vertices, 0.5 * (vertices[unique[:, 0]] + vertices[unique[:, 1]])])
        a, b, c = triangles.T
        triangles = np.concatenate([np.stack(t, 1) for t in ((a, mid[0], mid[2]), (b, mid[1], mid[0]),
                                                              (c, mid[2], mid[1]), (mid[0], mid[1], mid[2]))])
    vertices = np.asarray(center, float) + radius * vertices / np.linalg.norm(vertices, axis=1, keepdims=True)
    return vertices, orient(vertices, triangles, center)


def merge(parts):
    """Concatenate several ``(vertices, triangles)`` into one."""
    vertices, triangles, offset = [], [], 0
    for v, f in parts:
        vertices.append(v)
        triangles.append(f + offset)
        offset += len(v)
    return np.concatenate(vertices), np.concatenate(triangles)


def orient(vertices: np.ndarray, triangles: np.ndarray, reference, outward: bool = True) -> np.ndarray:
    """Flip triangles so their normals point away from ``reference`` (towards it if not outward)."""
    corners = vertices[triangles]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    away = np.einsum("ij,ij->i", normal, corners.mean(axis=1) - np.asarray(reference, float))
    flip = (away < 0) if outward else (away > 0)
    triangles = triangles.copy()
    triangles[flip] = triangles[flip][:, ::-1]
    return triangles
