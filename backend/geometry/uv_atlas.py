"""One UV atlas for the whole scene: the meshes' own UVs, or an xatlas unwrap.

Several objects share one atlas and therefore one texture: the caller passes a single
:class:`Mesh` holding all of them (``object_ids`` says which triangle belongs to which object),
and every object's charts are packed side by side into the same square. The texture that a bake
fills is then one image for the whole selection, and each object gets the same image with its
own part of the UV square.

xatlas runs in a child process (:mod:`.child`): it crashes on some large meshes and holds the
GIL for many seconds, and neither may take the backend down. ``python -m
backend.geometry.uv_atlas in.npz out.npz`` is that child.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import InputError, positive_int
from .child import PEAK_MEMORY_KEY, Check, Progress, child_main, run_child
from .mesh import UV_TOLERANCE, Mesh
from .polygon_charts import ChartMesh, keep_polygons_whole

# xatlas estimates texels per unit from the requested resolution only approximately, and its
# atlas can come out larger than asked; it is then packed again at a fixed resolution with the
# density scaled down by these factors until everything fits on a single page.
_REPACK_SCALES = (1.0, 0.95, 0.9, 0.8, 0.65, 0.5)
# Progress steps: mesh added, then each pack (first try and repacks), twice when polygons are joined.
_UNWRAP_STEPS = 1 + 2 * (1 + len(_REPACK_SCALES))
# xatlas needs from 0.2 ms per triangle (an icosphere) to over 1.5 ms (a 100k-triangle UV sphere,
# whose charts it packs several times); the limit is a backstop far beyond that which stops only
# runaway calls (a mesh scaled by 1e37 kept it busy for many minutes). Cancel works at any time.
UNWRAP_BASE_SECONDS = 300.0
UNWRAP_SECONDS_PER_TRIANGLE = 0.01


def unwrap_time_limit(triangles: int) -> float:
    """Seconds an unwrap of ``triangles`` triangles may take before it is stopped."""
    return UNWRAP_BASE_SECONDS + UNWRAP_SECONDS_PER_TRIANGLE * triangles


@dataclass(frozen=True, eq=False)
class Atlas:
    """A mesh with per-corner UVs in [0, 1] and how they were obtained.

    ``unwrapped`` is True when xatlas made the UVs (the add-on must then add a UV layer), False
    when the mesh's own UVs were kept. ``chart_ids`` (int32 per triangle, -1 for triangles
    xatlas left out, such as degenerate ones) is set only for unwrapped meshes; the bake uses
    charts to pad islands. ``padding`` is the guaranteed gap in texels between charts at
    ``resolution``, for unwrapped meshes. ``unwrap_peak_bytes``: the unwrap's peak memory (its
    child process's), 0 when unknown or not unwrapped.
    """

    mesh: Mesh
    unwrapped: bool
    resolution: int
    padding: int
    chart_ids: np.ndarray | None = None
    unwrap_peak_bytes: int = 0


def ensure_uvs(
    mesh: Mesh,
    resolution: int = 1024,
    padding: int = 4,
    *,
    time_limit: float | None = None,
    check: Check | None = None,
    progress: Progress | None = None,
) -> Atlas:
    """Keep the mesh's UVs when it has them, otherwise unwrap every object into one atlas.

    Charts of an unwrap sit at least ``padding`` texels apart in a ``resolution`` square texture,
    so dilating each island by up to ``padding`` texels never bleeds into a neighbour. xatlas
    takes roughly 2 s per 10k triangles on one CPU core (and packing may run more than once), so
    very dense scenes are slow here rather than rejected. The unwrap runs in a child process
    stopped after ``time_limit`` seconds (default :func:`unwrap_time_limit`); ``check`` is called
    while it runs (raise to cancel) and ``progress`` gets its (step, total). A crash or a timeout
    raises :class:`~backend.geometry.child.ChildFailed`.
    """
    if not isinstance(mesh, Mesh):
        raise InputError("mesh", f"must be a Mesh, got {type(mesh).__name__}")
    resolution = positive_int("resolution", resolution)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise InputError("padding", f"must be an integer >= 0, got {padding!r}")
    padding = int(padding)
    if resolution < 2 * padding + 8:
        raise InputError("resolution", f"must be at least 2 * padding + 8 = {2 * padding + 8}, got {resolution}")
    if mesh.uvs is not None:
        return Atlas(mesh, unwrapped=False, resolution=resolution, padding=padding)
    limit = unwrap_time_limit(len(mesh.triangles)) if time_limit is None else float(time_limit)
    inputs = {"vertices": mesh.vertices, "triangles": mesh.triangles,
              "resolution": np.int64(resolution), "padding": np.int64(padding)}
    if mesh.polygon_ids is not None:
        inputs["polygon_ids"] = mesh.polygon_ids
    result = run_child(__name__, inputs, what=f"xatlas unwrapping {len(mesh.triangles):,} triangles",
                       time_limit=limit, check=check, progress=progress)
    uvs, chart_ids = result["uvs"], result["chart_ids"]
    if uvs.min() < -UV_TOLERANCE or uvs.max() > 1.0 + UV_TOLERANCE:
        raise RuntimeError(f"xatlas returned UVs outside [0, 1]: [{uvs.min()}, {uvs.max()}]")
    return Atlas(mesh.with_uvs(uvs), unwrapped=True, resolution=resolution, padding=padding, chart_ids=chart_ids,
                 unwrap_peak_bytes=int(result[PEAK_MEMORY_KEY]))


def _unwrap_child(arrays: dict[str, np.ndarray], progress: Progress) -> dict[str, np.ndarray]:
    """The child process's work: the arrays :func:`ensure_uvs` sent in, the unwrap out."""
    uvs, chart_ids = _unwrap(arrays["vertices"], arrays["triangles"], int(arrays["resolution"]),
                             int(arrays["padding"]), progress, arrays.get("polygon_ids"))
    return {"uvs": uvs, "chart_ids": chart_ids}


def _unwrap(
    vertices: np.ndarray,
    triangles: np.ndarray,
    resolution: int,
    padding: int,
    progress: Progress,
    polygon_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-corner UVs (M, 3, 2) of the original triangles, and a chart id per triangle.

    With ``polygon_ids``, a polygon whose triangles xatlas put into different charts becomes a
    chart of its own (:mod:`.polygon_charts`) and the charts are packed again.
    """
    import xatlas

    steps = iter(range(1, _UNWRAP_STEPS + 1))
    report = lambda: progress(min(next(steps, _UNWRAP_STEPS), _UNWRAP_STEPS), _UNWRAP_STEPS)  # noqa: E731
    mesh_atlas = xatlas.Atlas()  # charts are computed once; repacking this atlas keeps them
    mesh_atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(triangles, np.uint32))
    report()
    atlas = _pack(lambda: mesh_atlas, resolution, padding, report)
    vertex_map, indices, uvs = atlas[0]
    if indices.shape != triangles.shape or not np.array_equal(vertex_map[indices], triangles):
        raise RuntimeError("xatlas changed the triangle order or count; cannot map UVs back to the mesh")
    chart_ids = _chart_ids(atlas, len(triangles))
    if polygon_ids is not None:
        texels = uvs.astype(np.float64) * [atlas.width, atlas.height]
        charts = ChartMesh(indices.astype(np.int64), texels, chart_ids)
        if keep_polygons_whole(vertices, triangles, polygon_ids, charts):
            # Pack the grown charts again, in texels of the first pack (one texel per UV unit).
            # xatlas packs a UV mesh wrongly when asked twice, so each try starts afresh.
            def uv_mesh() -> xatlas.Atlas:
                fresh = xatlas.Atlas()
                fresh.add_uv_mesh(charts.uvs.astype(np.float32), charts.corners.astype(np.uint32))
                return fresh

            atlas = _pack(uv_mesh, resolution, padding, report, texels_per_unit=1.0)
            uv_map, indices, uvs = atlas[0]
            if indices.shape != triangles.shape or not np.array_equal(uv_map[indices], charts.corners):
                raise RuntimeError("xatlas changed the triangle order or count; cannot map UVs back to the mesh")
            chart_ids = _chart_ids(atlas, len(triangles))
    # xatlas normalises by its own atlas size; rescale so one xatlas texel is one texture texel,
    # which keeps the padding exact (the atlas may be smaller than the texture, never larger).
    scale = np.array([atlas.width, atlas.height], np.float64) / resolution
    corner_uvs = (uvs.astype(np.float64)[indices] * scale).astype(np.float32)
    return corner_uvs, chart_ids


def _pack(atlas_for_try, resolution: int, padding: int, report, texels_per_unit: float = 0.0):
    """Chart (or take the UV mesh's charts) and pack them into one page of ``resolution`` texels.

    xatlas' first pack may come out larger than asked; the charts are then packed again at a
    density scaled down by :data:`_REPACK_SCALES` until they fit on one page. ``atlas_for_try``
    gives the atlas for each try (the same one again, or a fresh one); the last is returned.
    """
    import xatlas

    atlas = None

    def generate(density: float) -> None:
        nonlocal atlas
        atlas = atlas_for_try()
        pack = xatlas.PackOptions()
        pack.resolution = resolution
        pack.padding = padding
        pack.texels_per_unit = density
        atlas.generate(chart_options=xatlas.ChartOptions(), pack_options=pack)
        report()

    generate(texels_per_unit)
    if atlas.atlas_count == 1 and max(atlas.width, atlas.height) <= resolution:
        return atlas
    estimate = atlas.texels_per_unit * resolution / max(atlas.width, atlas.height, 1)
    for scale in _REPACK_SCALES:
        generate(estimate * scale)
        if atlas.atlas_count == 1:
            return atlas
    raise InputError("resolution", f"xatlas could not fit the charts into one {resolution}^2 atlas")


def _chart_ids(atlas, count: int) -> np.ndarray:
    chart_ids = np.full(count, -1, np.int32)
    for chart in range(atlas.get_mesh_chart_count(0)):
        chart_ids[np.asarray(atlas.get_mesh_chart(0, chart).faces, dtype=np.int64)] = chart
    return chart_ids


if __name__ == "__main__":
    child_main(_unwrap_child)
