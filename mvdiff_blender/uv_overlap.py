"""How much of a UV map is used twice: overlapping islands bake one texel for two surfaces.

A bake into overlapping UVs is silently wrong (two surfaces fight over the same texels, and the
last view wins), so "Active UV Map" jobs measure it first. The measure rasterises the UV triangles
onto a coarse grid in numpy: the share of covered texel centres that lie strictly inside two or
more triangles. The inside test is strict, so a texel centre on an edge two neighbouring triangles
share is counted by neither, and a clean map measures 0 whatever its resolution.
"""

from __future__ import annotations

import bpy
import numpy as np

GRID = 256  # texels per side of the grid; coarse islands' overlap shows at this size
UV_OVERLAP_LIMIT = 0.05
"""Share of used texels covered twice above which an "Active UV Map" job is refused."""
_CHUNK = 1 << 20  # (triangle, texel) candidate pairs tested at a time


def uv_triangles(obj: bpy.types.Object, uv_map: str | None = None) -> np.ndarray:
    """(triangles, 3, 2) float64 UVs of the object's own mesh in ``uv_map`` (None: the active map)."""
    me = obj.data
    layer = me.uv_layers.get(uv_map) if uv_map else me.uv_layers.active
    if layer is None:
        return np.zeros((0, 3, 2))
    me.calc_loop_triangles()
    loops = np.empty(len(me.loop_triangles) * 3, np.int32)
    me.loop_triangles.foreach_get("loops", loops)
    uv = np.empty(len(me.loops) * 2, np.float32)
    layer.uv.foreach_get("vector", uv)
    return uv.reshape(-1, 2)[loops].reshape(-1, 3, 2).astype(np.float64)


def overlap_fraction(triangles: np.ndarray, grid: int = GRID) -> float:
    """Share of the texel centres covered by ``triangles`` (N, 3, 2 in 0-1) that two or more cover."""
    tri = np.asarray(triangles, np.float64).reshape(-1, 3, 2) * grid
    area = _edge(tri[:, 0], tri[:, 1], tri[:, 2])
    tri = tri[np.abs(area) > 1e-12]
    if not len(tri):
        return 0.0
    flip = _edge(tri[:, 0], tri[:, 1], tri[:, 2]) < 0
    tri[flip] = tri[flip][:, [0, 2, 1]]
    # Texel centres at (i + 0.5, j + 0.5): the candidates of a triangle are those in its bounding box.
    lo = np.clip(np.ceil(tri.min(axis=1) - 0.5), 0, grid).astype(np.int64)
    hi = np.clip(np.floor(tri.max(axis=1) - 0.5), -1, grid - 1).astype(np.int64)
    w = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    h = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    counts = np.zeros(grid * grid, np.int32)
    sizes = w * h
    start = 0
    while start < len(tri):
        stop = start + max(1, int(np.searchsorted(np.cumsum(sizes[start:]), _CHUNK)))
        _cover(tri[start:stop], lo[start:stop], w[start:stop], sizes[start:stop], grid, counts)
        start = stop
    covered = np.count_nonzero(counts)
    return float(np.count_nonzero(counts > 1) / covered) if covered else 0.0


def _cover(tri, lo, w, sizes, grid, counts) -> None:
    owner = np.repeat(np.arange(len(tri)), sizes)
    if not len(owner):
        return
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = np.arange(len(owner)) - first[owner]
    x = lo[owner, 0] + local % w[owner]
    y = lo[owner, 1] + local // w[owner]
    p = np.stack([x + 0.5, y + 0.5], axis=1)
    t = tri[owner]
    inside = ((_edge(t[:, 0], t[:, 1], p) > 0) & (_edge(t[:, 1], t[:, 2], p) > 0)
              & (_edge(t[:, 2], t[:, 0], p) > 0))
    np.add.at(counts, (y * grid + x)[inside], 1)


def _edge(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (b[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[:, 0] - a[:, 0])
