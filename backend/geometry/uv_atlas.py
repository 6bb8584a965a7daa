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
from .child import Check, Progress, child_main, run_child
from .mesh import UV_TOLERANCE, Mesh

# xatlas estimates texels per unit from the requested resolution only approximately, and its
# atlas can come out larger than asked; it is then packed again at a fixed resolution with the
# density scaled down by these factors until everything fits on a single page.
_REPACK_SCALES = (1.0, 0.95, 0.9, 0.8, 0.65, 0.5)
_UNWRAP_STEPS = 2 + len(_REPACK_SCALES)  # progress steps: mesh added, charts packed, each repack
# xatlas needs about 0.2 ms per triangle, more when it packs again; the limit leaves a wide margin
# and stops only runaway calls (a mesh scaled by 1e37 kept it busy for many minutes).
UNWRAP_BASE_SECONDS = 60.0
UNWRAP_SECONDS_PER_TRIANGLE = 1e-3


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
    ``resolution``, for unwrapped meshes.
    """

    mesh: Mesh
    unwrapped: bool
    resolution: int
    padding: int
    chart_ids: np.ndarray | None = None


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
    result = run_child(__name__, inputs, what=f"xatlas unwrapping {len(mesh.triangles):,} triangles",
                       time_limit=limit, check=check, progress=progress)
    uvs, chart_ids = result["uvs"], result["chart_ids"]
    if uvs.min() < -UV_TOLERANCE or uvs.max() > 1.0 + UV_TOLERANCE:
        raise RuntimeError(f"xatlas returned UVs outside [0, 1]: [{uvs.min()}, {uvs.max()}]")
    return Atlas(mesh.with_uvs(uvs), unwrapped=True, resolution=resolution, padding=padding, chart_ids=chart_ids)


def _unwrap_child(arrays: dict[str, np.ndarray], progress: Progress) -> dict[str, np.ndarray]:
    """The child process's work: the arrays :func:`ensure_uvs` sent in, the unwrap out."""
    uvs, chart_ids = _unwrap(arrays["vertices"], arrays["triangles"], int(arrays["resolution"]),
                             int(arrays["padding"]), progress)
    return {"uvs": uvs, "chart_ids": chart_ids}


def _unwrap(
    vertices: np.ndarray, triangles: np.ndarray, resolution: int, padding: int, progress: Progress
) -> tuple[np.ndarray, np.ndarray]:
    """Per-corner UVs (M, 3, 2) of the original triangles, and a chart id per triangle."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(triangles, np.uint32))
    progress(1, _UNWRAP_STEPS)
    chart_options = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = resolution
    pack.padding = padding
    atlas.generate(chart_options=chart_options, pack_options=pack)
    progress(2, _UNWRAP_STEPS)
    if atlas.atlas_count != 1 or max(atlas.width, atlas.height) > resolution:
        estimate = atlas.texels_per_unit * resolution / max(atlas.width, atlas.height, 1)
        for step, scale in enumerate(_REPACK_SCALES, start=3):
            pack = xatlas.PackOptions()
            pack.resolution = resolution
            pack.padding = padding
            pack.texels_per_unit = estimate * scale
            atlas.generate(chart_options=chart_options, pack_options=pack)
            progress(step, _UNWRAP_STEPS)
            if atlas.atlas_count == 1:
                break
        else:
            raise InputError("resolution", f"xatlas could not fit the charts into one {resolution}^2 atlas")
    vertex_map, indices, uvs = atlas[0]
    if indices.shape != triangles.shape or not np.array_equal(vertex_map[indices], triangles):
        raise RuntimeError("xatlas changed the triangle order or count; cannot map UVs back to the mesh")
    # xatlas normalises by its own atlas size; rescale so one xatlas texel is one texture texel,
    # which keeps the padding exact (the atlas may be smaller than the texture, never larger).
    scale = np.array([atlas.width, atlas.height], np.float64) / resolution
    corner_uvs = (uvs.astype(np.float64)[indices] * scale).astype(np.float32)
    chart_ids = np.full(len(triangles), -1, np.int32)
    for chart in range(atlas.get_mesh_chart_count(0)):
        chart_ids[np.asarray(atlas.get_mesh_chart(0, chart).faces, dtype=np.int64)] = chart
    return corner_uvs, chart_ids


if __name__ == "__main__":
    child_main(_unwrap_child)
