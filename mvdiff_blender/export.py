"""Evaluated Blender meshes to the backend's arrays: world-space triangles, per-corner UVs, object ids.

Everything goes through ``foreach_get`` into buffers of the exact size and native dtype (float32,
int32); any other buffer makes Blender fall back to a per-element path that is orders of magnitude
slower. Transforms are applied in numpy. Modifiers are applied (``to_mesh`` of the evaluated
object), because the cameras see the evaluated geometry.

Corner order: an object with a mirroring transform (negative determinant) has its triangles'
corners 1 and 2 swapped, so that the winding, from which the backend takes the outward normal,
stays counter-clockwise seen from the front in world space. Whatever per-corner data comes back
for such an object (the backend's UVs) is in that swapped order; :func:`corner_order` says how to
undo it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import bpy
import numpy as np

from ..backend.geometry.mesh import UV_TOLERANCE, Mesh
from ..backend.validation import InputError

# Object types whose evaluated form can be a triangle mesh (curves only with bevel or extrusion).
GEOMETRY_TYPES = frozenset({"MESH", "CURVE", "SURFACE", "FONT", "META"})
UV_SOURCES = ("ACTIVE", "UNWRAP")
_FLIPPED = np.array([0, 2, 1])
_KEPT = np.array([0, 1, 2])


class ExportError(ValueError):
    """The objects cannot be exported as asked; the message names the object and what to change."""


@dataclass
class ExportedScene:
    """What a texture job needs from the scene.

    ``uv_maps``: with ``uv_source="ACTIVE"``, the name of each object's UV map the texture is
    baked into (pass it to ``apply_texture(uv_map=...)``, so a later change of the active map
    does not matter); empty with ``"UNWRAP"``.
    """

    mesh: Mesh
    object_names: list[str]
    occluders: Mesh | None
    uv_maps: list[str] = field(default_factory=list)


@dataclass
class _Arrays:
    vertices: np.ndarray  # (N, 3) float32, world space
    triangles: np.ndarray  # (M, 3) int32
    uvs: np.ndarray | None  # (M, 3, 2) float32
    uv_map: str | None
    polygons: np.ndarray | None = None  # (M,) the polygon of each triangle, for an unwrap


def mirrored(obj: bpy.types.Object) -> bool:
    """Whether the object's transform mirrors it (negative determinant), which reverses the winding."""
    return bool(np.linalg.det(np.array(obj.matrix_world, dtype=np.float64)[:3, :3]) < 0)


def corner_order(obj: bpy.types.Object) -> np.ndarray:
    """Index array mapping exported triangle corners back to the object's own corner order (and back)."""
    return _FLIPPED if mirrored(obj) else _KEPT


def export_meshes(
    depsgraph: bpy.types.Depsgraph,
    objects: Sequence[bpy.types.Object],
    uv_source: str,
    occluders: Iterable[bpy.types.Object] = (),
) -> ExportedScene:
    """The textured ``objects`` as one Mesh (object ids in the order given) plus the occluders as another.

    ``uv_source`` "ACTIVE": each object's active UV map is sent (one object only: several would
    overlap in the one texture). "UNWRAP": no UVs are sent; the backend unwraps and the add-on
    later writes the new UVs onto the object's own mesh, so its modifiers must keep the topology.
    """
    if uv_source not in UV_SOURCES:
        raise ExportError(f"unknown UV source {uv_source!r}; expected one of {', '.join(UV_SOURCES)}")
    objects = list(objects)
    if not objects:
        raise ExportError("no objects to texture: select at least one mesh object")
    _check_textured(objects, uv_source)

    parts = []
    for obj in objects:
        part = _object_arrays(obj, depsgraph, uv_source=uv_source)
        if len(part.triangles) == 0:
            raise ExportError(f"'{obj.name}' has no faces to texture")
        parts.append(part)
    mesh = _merge(parts, with_uvs=uv_source == "ACTIVE", what=", ".join(f"'{o.name}'" for o in objects))
    occluder_mesh = export_occluders(depsgraph, occluders)
    uv_maps = [p.uv_map for p in parts] if uv_source == "ACTIVE" else []
    return ExportedScene(mesh=mesh, object_names=[o.name for o in objects], occluders=occluder_mesh,
                         uv_maps=uv_maps)


def export_occluders(depsgraph: bpy.types.Depsgraph, objects: Iterable[bpy.types.Object]) -> Mesh | None:
    """Other geometry as one Mesh without UVs (None when nothing has faces); objects without faces are skipped."""
    parts = []
    for obj in objects:
        if obj.type not in GEOMETRY_TYPES:
            continue
        part = _object_arrays(obj, depsgraph, uv_source=None)
        if len(part.triangles):
            parts.append(part)
    if not parts:
        return None
    return _merge(parts, with_uvs=False, what="the occluders", single_object=True)


def scene_occluders(
    scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, textured: Iterable[bpy.types.Object]
) -> list[bpy.types.Object]:
    """The objects a render of the view layer's cameras would show, other than ``textured``.

    Render visibility, as the depth renders see it: in a collection that is neither excluded nor
    disabled for renders (itself and its parents), not disabled for renders itself, visible to
    camera rays, and of a type that can evaluate to faces. Instances (collection instances,
    particles, geometry-node instances) are not objects here and are not included.
    """
    view_layer = depsgraph.view_layer if depsgraph.view_layer is not None else scene.view_layers[0]
    skip = {o.name_full for o in textured}
    seen: set[str] = set()
    result = []
    for collection in _render_collections(view_layer.layer_collection, visible=True):
        for obj in collection.objects:
            if obj.name_full in seen or obj.name_full in skip:
                continue
            seen.add(obj.name_full)
            if obj.type in GEOMETRY_TYPES and not obj.hide_render and getattr(obj, "visible_camera", True):
                result.append(obj)
    return result


def _render_collections(layer_collection, visible: bool):
    """Collections whose objects render: not excluded, not hidden for renders, nor any parent."""
    if layer_collection.exclude:
        return
    collection = layer_collection.collection
    visible = visible and not collection.hide_render and not layer_collection.indirect_only
    if visible:
        yield collection
    for child in layer_collection.children:
        yield from _render_collections(child, visible)


def _check_textured(objects: list[bpy.types.Object], uv_source: str) -> None:
    names = [o.name_full for o in objects]
    if len(set(names)) != len(names):
        raise ExportError("an object is listed twice among the objects to texture")
    for obj in objects:
        if obj.type != "MESH":
            raise ExportError(f"'{obj.name}' is a {obj.type.lower()} object; only mesh objects can be textured "
                              "(convert it to a mesh first)")
        if obj.mode == "EDIT":
            raise ExportError(f"'{obj.name}' is in Edit Mode; switch to Object Mode before texturing")
    if uv_source == "ACTIVE" and len(objects) > 1:
        raise ExportError(f"UVs 'Active UV Map' textures one object only ({len(objects)} selected: their UV maps "
                          "would overlap in the one texture); select one object or set UVs to 'Unwrap'")
    if uv_source == "UNWRAP":
        owners: dict[str, str] = {}
        for obj in objects:
            other = owners.setdefault(obj.data.name_full, obj.name)
            if other != obj.name:
                raise ExportError(f"'{other}' and '{obj.name}' share the mesh '{obj.data.name}', which can hold only "
                                  "one unwrap; make them single-user (Object > Relations > Make Single User)")


def _object_arrays(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph, *, uv_source: str | None) -> _Arrays:
    """Vertices in world space, triangles and (for "ACTIVE") per-corner UVs of the evaluated object."""
    evaluated = obj.evaluated_get(depsgraph)
    if uv_source is not None and not evaluated.is_evaluated:
        raise ExportError(f"'{obj.name}' is disabled in the viewport, so Blender does not evaluate its modifiers; "
                          "enable it (the monitor icon in the Outliner) before texturing")
    matrix = np.array(evaluated.matrix_world, dtype=np.float64)
    me = evaluated.to_mesh()
    try:
        if me is None:
            return _Arrays(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), None, None)
        me.calc_loop_triangles()
        n_tris = len(me.loop_triangles)
        co = np.empty(len(me.vertices) * 3, np.float32)
        me.vertices.foreach_get("co", co)
        triangles = np.empty(n_tris * 3, np.int32)
        me.loop_triangles.foreach_get("vertices", triangles)
        uvs, uv_map, polygons = None, None, None
        if uv_source == "ACTIVE":
            uvs, uv_map = _active_uvs(obj, me)
        elif uv_source == "UNWRAP":
            _check_topology(obj, me)
            # The unwrap keeps each polygon in one chart: Blender stores one UV per polygon corner.
            polygons = np.empty(n_tris, np.int32)
            me.loop_triangles.foreach_get("polygon_index", polygons)
    finally:
        evaluated.to_mesh_clear()

    vertices = co.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    order = _FLIPPED if np.linalg.det(matrix[:3, :3]) < 0 else _KEPT
    triangles = triangles.reshape(-1, 3)[:, order]
    if uvs is not None:
        uvs = uvs[:, order]
    return _Arrays(vertices.astype(np.float32), np.ascontiguousarray(triangles), uvs, uv_map, polygons)


def _active_uvs(obj: bpy.types.Object, me: bpy.types.Mesh) -> tuple[np.ndarray, str]:
    layer = me.uv_layers.active
    if layer is None:
        raise ExportError(f"'{obj.name}' has no UV map; add one (UV Editing) or set UVs to 'Unwrap'")
    loops = np.empty(len(me.loop_triangles) * 3, np.int32)
    me.loop_triangles.foreach_get("loops", loops)
    uv = np.empty(len(me.loops) * 2, np.float32)
    layer.uv.foreach_get("vector", uv)
    uvs = uv.reshape(-1, 2)[loops].reshape(-1, 3, 2)
    if uvs.size and not np.isfinite(uvs).all():
        raise ExportError(f"UV map '{layer.name}' of '{obj.name}' holds NaN or infinite values")
    if uvs.size and (uvs.min() < -UV_TOLERANCE or uvs.max() > 1 + UV_TOLERANCE):
        raise ExportError(
            f"UV map '{layer.name}' of '{obj.name}' reaches outside the 0-1 square ({uvs.min():.3g} to "
            f"{uvs.max():.3g}: tiling or UDIM); one texture cannot hold it. Fit the UVs into 0-1 or set UVs to 'Unwrap'"
        )
    return uvs, layer.name


def _check_topology(obj: bpy.types.Object, evaluated: bpy.types.Mesh) -> None:
    """The unwrap is written back through the object's own triangles: they must be the evaluated ones."""
    own = obj.data
    own.calc_loop_triangles()
    fix = ("apply the modifier, or give the object a UV map and set UVs to 'Active UV Map'")
    if len(own.loops) != len(evaluated.loops) or len(own.loop_triangles) != len(evaluated.loop_triangles):
        raise ExportError(
            f"'{obj.name}': its modifiers change its faces ({len(own.loop_triangles)} triangles in the mesh, "
            f"{len(evaluated.loop_triangles)} after modifiers), so the new UV map cannot be written back; {fix}"
        )
    mine = np.empty(len(own.loop_triangles) * 3, np.int32)
    own.loop_triangles.foreach_get("loops", mine)
    theirs = np.empty(len(evaluated.loop_triangles) * 3, np.int32)
    evaluated.loop_triangles.foreach_get("loops", theirs)
    if not np.array_equal(mine, theirs):
        raise ExportError(
            f"'{obj.name}': its modifiers split some quads or n-gons into triangles differently from the mesh "
            f"itself, so the new UV map cannot be written back; triangulate the mesh first, or {fix}"
        )


def _merge(parts: list[_Arrays], *, with_uvs: bool, what: str, single_object: bool = False) -> Mesh:
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    triangles = np.concatenate([p.triangles + off for p, off in zip(parts, offsets, strict=True)])
    ids = [np.full(len(p.triangles), 0 if single_object else k, np.int32) for k, p in enumerate(parts)]
    uvs = np.concatenate([p.uvs for p in parts]) if with_uvs else None
    polygons = None
    if all(p.polygons is not None for p in parts):  # numbered across objects, as the backend wants
        starts = np.cumsum([0] + [int(p.polygons.max()) + 1 for p in parts[:-1]])
        polygons = np.concatenate([p.polygons.astype(np.int64) + start for p, start in zip(parts, starts, strict=True)])
    try:
        return Mesh(np.concatenate([p.vertices for p in parts]), triangles, uvs, np.concatenate(ids), polygons)
    except InputError as err:
        raise ExportError(f"{what} cannot be exported: {err}") from None
