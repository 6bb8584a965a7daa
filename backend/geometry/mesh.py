"""Triangle meshes as the add-on exports them: world space, flat arrays, per-corner UVs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import InputError, as_array

# UVs a little outside [0, 1] are common (rounding in unwrappers); anything beyond is a tiling
# layout that a single texture cannot hold.
UV_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class Mesh:
    """World-space triangles of one or several objects.

    ``uvs`` are per triangle corner, (M, 3, 2), with (0, 0) at the texture's bottom-left as in
    Blender. ``object_ids`` says which object each triangle came from. ``polygon_ids`` (optional)
    says which polygon (quad, n-gon) each triangle came from, numbered across all objects: Blender
    keeps one UV per polygon corner, so an unwrap keeps every polygon whole in one chart.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    uvs: np.ndarray | None = None
    object_ids: np.ndarray | None = None
    polygon_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        vertices = as_array("vertices", self.vertices, shape=(None, 3), dtype=np.float32)
        triangles = as_array("triangles", self.triangles, shape=(None, 3), dtype=np.int64)
        if len(vertices) == 0:
            raise InputError("vertices", "mesh has no vertices")
        if len(triangles) == 0:
            raise InputError("triangles", "mesh has no triangles")
        if triangles.min() < 0 or triangles.max() >= len(vertices):
            raise InputError(
                "triangles", f"indices must lie in [0, {len(vertices) - 1}], got [{triangles.min()}, {triangles.max()}]"
            )
        triangles = triangles.astype(np.int32)
        uvs = self.uvs
        if uvs is not None:
            uvs = as_array("uvs", uvs, shape=(len(triangles), 3, 2), dtype=np.float32)
            if uvs.min() < -UV_TOLERANCE or uvs.max() > 1 + UV_TOLERANCE:
                raise InputError(
                    "uvs", f"must lie in [0, 1] (one texture, no tiling), got [{uvs.min():.4g}, {uvs.max():.4g}]"
                )
            uvs = np.clip(uvs, 0.0, 1.0)
        object_ids = self.object_ids
        if object_ids is None:
            object_ids = np.zeros(len(triangles), np.int32)
        object_ids = as_array("object_ids", object_ids, shape=(len(triangles),), dtype=np.int32)
        object.__setattr__(self, "vertices", vertices)
        object.__setattr__(self, "triangles", triangles)
        object.__setattr__(self, "uvs", uvs)
        object.__setattr__(self, "object_ids", object_ids)
        object.__setattr__(self, "polygon_ids", _polygon_ids(self.polygon_ids, object_ids))
        if not np.any(self.areas() > 0):
            raise InputError("triangles", "every triangle is degenerate (zero area)")

    @property
    def corners(self) -> np.ndarray:
        """Vertex positions per triangle corner, (M, 3, 3)."""
        return self.vertices[self.triangles]

    def face_normals(self) -> np.ndarray:
        """Unit normals from the winding (counter-clockwise seen from the front); 0 if degenerate."""
        c = self.corners.astype(np.float64)
        n = np.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0])
        length = np.linalg.norm(n, axis=1, keepdims=True)
        return np.divide(n, length, out=np.zeros_like(n), where=length > 0)

    def areas(self) -> np.ndarray:
        c = self.corners.astype(np.float64)
        return 0.5 * np.linalg.norm(np.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]), axis=1)

    @property
    def num_objects(self) -> int:
        return int(self.object_ids.max()) + 1

    def with_uvs(self, uvs: np.ndarray) -> Mesh:
        return Mesh(self.vertices, self.triangles, uvs, self.object_ids, self.polygon_ids)

    @staticmethod
    def concatenate(meshes: list[Mesh]) -> Mesh:
        """Merge meshes into one, numbering objects in order (each input keeps its own ids)."""
        if not meshes:
            raise InputError("meshes", "need at least one mesh")
        vertices, triangles, uvs, ids, polygons = [], [], [], [], []
        offset, id_offset, polygon_offset = 0, 0, 0
        for mesh in meshes:
            vertices.append(mesh.vertices)
            triangles.append(mesh.triangles + offset)
            uvs.append(mesh.uvs)
            ids.append(mesh.object_ids + id_offset)
            if mesh.polygon_ids is not None:
                polygons.append(mesh.polygon_ids + polygon_offset)
                polygon_offset += int(mesh.polygon_ids.max()) + 1
            offset += len(mesh.vertices)
            id_offset += mesh.num_objects
        merged_uvs = None if any(u is None for u in uvs) else np.concatenate(uvs)
        merged_polygons = np.concatenate(polygons) if len(polygons) == len(meshes) else None
        return Mesh(np.concatenate(vertices), np.concatenate(triangles), merged_uvs, np.concatenate(ids),
                    merged_polygons)


def _polygon_ids(polygon_ids: object, object_ids: np.ndarray) -> np.ndarray | None:
    """Validated polygon ids (int64 >= 0, each polygon within one object), or None."""
    if polygon_ids is None:
        return None
    ids = as_array("polygon_ids", polygon_ids, shape=(len(object_ids),), dtype=np.int64)
    if ids.min() < 0:
        raise InputError("polygon_ids", f"must be >= 0, got {ids.min()}")
    order = np.lexsort((object_ids, ids))
    same_polygon = ids[order][1:] == ids[order][:-1]
    if np.any(same_polygon & (object_ids[order][1:] != object_ids[order][:-1])):
        raise InputError("polygon_ids", "a polygon's triangles must belong to one object (number polygons "
                         "across objects)")
    return ids
