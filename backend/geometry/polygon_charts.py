"""Keep each polygon (a quad, an n-gon) whole in one UV chart.

xatlas unwraps triangles, so a chart seam may run along the diagonal of a quad. Blender keeps
one UV per polygon corner, shared by the polygon's triangles: when the two halves of a quad lie
in different charts, whichever triangle is written last moves the shared corners, and the other
half then stretches across the atlas (on Sponza, a triangle spanning about 1,040 texels instead
of about 2). This module gives every polygon that xatlas split a chart of its own: its largest
triangle keeps its UVs (and so the texel density of its chart), the others are unfolded flat
across shared edges. The atlas is then packed again (xatlas' UV-mesh mode). A chart of its own
cannot overlap another chart once packed, whereas joining the stray triangles to a neighbouring
chart can fold them over that chart's other triangles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChartMesh:
    """xatlas' output for one mesh: corner -> output vertex, and each output vertex's UV.

    ``corners`` (M, 3) indexes ``uvs`` (V', 2, in texels); ``chart_ids`` (M,) is -1 for
    triangles xatlas left out.
    """

    corners: np.ndarray
    uvs: np.ndarray
    chart_ids: np.ndarray


def split_polygons(polygon_ids: np.ndarray, chart_ids: np.ndarray) -> list[np.ndarray]:
    """The triangle indices of every polygon whose triangles lie in more than one chart."""
    order = np.argsort(polygon_ids, kind="stable")
    ids, charts = polygon_ids[order], chart_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    low = np.minimum.reduceat(charts, starts)
    high = np.maximum.reduceat(charts, starts)
    return [order[s:e] for s, e in zip(starts[low != high], ends[low != high], strict=True)]


def keep_polygons_whole(vertices: np.ndarray, triangles: np.ndarray, polygon_ids: np.ndarray,
                        charts: ChartMesh) -> int:
    """Give every split polygon a chart of its own, in place; returns how many triangles moved.

    A triangle that shares no edge with the rest of its polygon (Blender never triangulates a
    polygon into disconnected pieces, but a job may say anything) stays where it is.
    """
    vertices = np.asarray(vertices, np.float64)
    new_uvs: list[np.ndarray] = []
    moved, islands = 0, [0]
    for members in split_polygons(polygon_ids, charts.chart_ids):
        moved += _own_chart(vertices, triangles, members, charts, new_uvs)
        islands.append(len(new_uvs))
    if new_uvs:
        uvs = np.asarray(new_uvs, np.float64)
        _spread(uvs, islands, float(charts.uvs[:, 0].max()) if len(charts.uvs) else 0.0)
        charts.uvs = np.concatenate([charts.uvs, uvs.astype(charts.uvs.dtype)])
    return moved


def _spread(uvs: np.ndarray, bounds: list[int], right: float) -> None:
    """Move each new island (rows ``bounds[k]:bounds[k + 1]`` of ``uvs``) to a cell of its own, right of ``right``.

    xatlas' UV-mesh mode joins triangles whose corners share a UV position, so an island that
    still touched the chart it came from would be packed as part of it again; it also needs
    UVs >= 0.
    """
    pieces = [uvs[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    cell = 4.0 + max(float((piece.max(axis=0) - piece.min(axis=0)).max()) for piece in pieces)
    columns = int(np.ceil(np.sqrt(len(pieces))))
    for k, piece in enumerate(pieces):
        corner = np.array([right + cell * (1 + k % columns), cell * (k // columns)], np.float64)
        piece += corner - piece.min(axis=0)


def _own_chart(vertices, triangles, members, charts: ChartMesh, new_uvs: list) -> int:
    """Lay one split polygon out as its own chart, unfolded from its largest triangle; returns its triangle count.

    The largest triangle keeps its UVs (and so its chart's texel density); every other triangle
    is unfolded across an edge it shares with the triangles laid out before it. A chart of its
    own cannot overlap any other chart once packed again, whereas joining the polygon to a
    neighbouring chart could fold it over that chart's other triangles.
    """
    corners = vertices[triangles[members]]
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    seed = int(members[np.argmax(areas)])
    chart = int(charts.chart_ids.max()) + 1
    slot: dict[int, int] = {}  # input vertex -> its output vertex in the new chart
    for k in range(3):
        v = int(triangles[seed, k])
        slot[v] = _add(charts, new_uvs, _uv(charts, new_uvs, int(charts.corners[seed, k])))
    _attach(triangles, charts, seed, slot, chart)
    placed, stray = [seed], [int(t) for t in members if int(t) != seed]
    while stray:
        for t in stray:
            edge = _shared_edge(triangles, t, placed, slot)
            if edge is not None:
                break
        else:
            break  # not edge-connected to the rest (bad input): left where xatlas put it
        stray.remove(t)
        reference, a, b = edge
        for v in (int(v) for v in triangles[t]):
            if v not in slot:
                uv = _unfold(vertices, triangles, charts, new_uvs, reference, a, b, v)
                slot[v] = _add(charts, new_uvs, uv)
        _attach(triangles, charts, t, slot, chart)
        placed.append(t)
    return len(placed)


def _uv(charts: ChartMesh, new_uvs: list, index: int) -> np.ndarray:
    return np.asarray(charts.uvs[index] if index < len(charts.uvs) else new_uvs[index - len(charts.uvs)], np.float64)


def _add(charts: ChartMesh, new_uvs: list, uv: np.ndarray) -> int:
    new_uvs.append(uv)
    return len(charts.uvs) + len(new_uvs) - 1


def _attach(triangles, charts: ChartMesh, t: int, slot: dict[int, int], chart: int) -> None:
    charts.corners[t] = [slot[int(v)] for v in triangles[t]]
    charts.chart_ids[t] = chart


def _shared_edge(triangles, t: int, placed: list[int], slot: dict[int, int]):
    """A placed triangle sharing an edge with ``t``, and that edge's two input vertices."""
    mine = set(int(v) for v in triangles[t])
    for other in placed:
        common = [int(v) for v in triangles[other] if int(v) in mine]
        if len(common) >= 2 and all(v in slot for v in common[:2]):
            return other, common[0], common[1]
    return None


def _unfold(vertices, triangles, charts: ChartMesh, new_uvs: list, reference: int, a: int, b: int, c: int):
    """UV of vertex ``c`` laid flat across edge (a, b) of the placed triangle ``reference``, on its far side."""
    slots = dict(zip((int(v) for v in triangles[reference]), (int(i) for i in charts.corners[reference]), strict=True))
    ua, ub = _uv(charts, new_uvs, slots[a]), _uv(charts, new_uvs, slots[b])
    opposite = next(v for v in slots if v not in (a, b))
    ur = _uv(charts, new_uvs, slots[opposite])
    pa, pb, pc = vertices[a], vertices[b], vertices[c]
    edge = pb - pa
    length2 = float(edge @ edge)
    if length2 == 0.0:
        return ua
    along = float((pc - pa) @ edge) / length2
    height = float(np.linalg.norm(pc - pa - along * edge)) / np.sqrt(length2)
    span = ub - ua
    normal = np.array([-span[1], span[0]])
    if normal @ (ur - ua) > 0:  # the far side of the edge from the placed triangle
        normal = -normal
    return ua + along * span + height * normal
