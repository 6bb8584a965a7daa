"""The demo room: a furnished box with a procedural ground-truth texture and a camera loop.

It is the project's ground truth: baking its rendered views must give its texture back, and
generated textures of it can be compared across methods. The texture is a smooth function of
world position per object (stripes, planks, blotches with feature sizes of 0.1 m and up), so it
is continuous across UV seams and representable at the resolution of 256 x 192 views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry.cameras import Camera, look_at
from ..geometry.mesh import Mesh
from ..geometry.raster import TexelSurface, rasterize_uv
from ..geometry.uv_atlas import Atlas, ensure_uvs
from . import shapes

ROOM_SIZE = (6.0, 5.0, 2.8)


@dataclass(frozen=True)
class DemoRoom:
    mesh: Mesh
    object_names: list[str]


def build_demo_room(wall_cell: float = 0.5) -> DemoRoom:
    """Walls, floor and ceiling (facing inwards) and furniture: boxes, a cylinder, spheres."""
    sx, sy, sz = ROOM_SIZE
    centre = np.array([0.0, 0.0, sz / 2])
    objects: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(name: str, part, reference, outward: bool = True) -> None:
        vertices, triangles = part
        objects.setdefault(name, []).append((vertices, shapes.orient(vertices, triangles, reference, outward)))

    low = np.array([-sx / 2, -sy / 2, 0.0])
    add("floor", shapes.grid(low, [sx, 0, 0], [0, sy, 0], round(sx / wall_cell), round(sy / wall_cell)), centre, False)
    add("ceiling", shapes.grid(low + [0, 0, sz], [sx, 0, 0], [0, sy, 0], round(sx / wall_cell), round(sy / wall_cell)),
        centre, False)
    walls = shapes.box(centre, ROOM_SIZE, cell=wall_cell)
    keep = _vertical_faces(*walls)
    add("walls", (walls[0], walls[1][keep]), centre, False)

    def add_box(name: str, box_centre, size) -> None:
        add(name, shapes.box(box_centre, size), box_centre)

    add_box("table", [1.6, -1.2, 0.74], [1.4, 0.8, 0.06])
    for dx in (-0.62, 0.62):
        for dy in (-0.32, 0.32):
            add_box("table", [1.6 + dx, -1.2 + dy, 0.355], [0.06, 0.06, 0.71])
    add_box("cabinet", [-2.75, -1.0, 0.9], [0.5, 1.1, 1.8])
    add_box("sofa", [0.0, 2.2, 0.25], [2.0, 0.6, 0.5])
    add_box("sofa", [0.0, 2.42, 0.6], [2.0, 0.16, 0.7])
    column = shapes.cylinder([2.3, 1.8, 0.0], 0.25, 1.1, segments=40)
    add("column", column, [2.3, 1.8, 0.55])
    add("ball", shapes.uv_sphere([-1.9, 1.5, 0.35], 0.35, rings=18, segments=36), [-1.9, 1.5, 0.35])
    add("lamp", shapes.uv_sphere([1.9, -1.3, 0.92], 0.15, rings=12, segments=24), [1.9, -1.3, 0.92])

    names = list(objects)
    meshes = []
    for name in names:
        vertices, triangles = shapes.merge(objects[name])
        meshes.append(Mesh(vertices.astype(np.float32), triangles))
    return DemoRoom(Mesh.concatenate(meshes), names)


def _vertical_faces(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Triangles of a box whose normal is horizontal (the walls, not floor or ceiling)."""
    corners = vertices[triangles]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    return np.abs(normal[:, 2]) < 1e-9


def trajectory(count: int, *, phase: float = 0.0, width: int = 256, height: int = 192,
               fov_deg: float = 80.0) -> list[Camera]:
    """``count`` cameras on a closed loop through the room, looking outwards at walls and furniture.

    ``phase`` in [0, 1) shifts the samples along the loop by that fraction of one step, so
    ``phase=0.5`` gives held-out poses half-way between the poses of ``phase=0``.
    """
    cameras = []
    for k in range(count):
        s = (k + phase) / count
        angle = 2 * math.pi * s
        eye = np.array([1.2 * math.cos(angle), 0.9 * math.sin(angle), 1.45 + 0.1 * math.sin(2 * angle)])
        yaw = angle + 0.3 * math.sin(2 * angle)
        pitch = math.radians(-15.0 + 12.0 * math.sin(2 * angle + 0.7))
        direction = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
        cameras.append(Camera.from_fov(fov_deg, width, height, look_at(eye, eye + direction)))
    return cameras


_BASE_COLOURS = {
    "floor": (0.55, 0.38, 0.22),
    "ceiling": (0.85, 0.83, 0.78),
    "walls": (0.62, 0.70, 0.78),
    "table": (0.45, 0.27, 0.15),
    "cabinet": (0.30, 0.45, 0.35),
    "sofa": (0.62, 0.25, 0.28),
    "column": (0.80, 0.78, 0.70),
    "ball": (0.85, 0.62, 0.18),
    "lamp": (0.95, 0.90, 0.60),
}


def ground_truth_colours(positions: np.ndarray, object_ids: np.ndarray, object_names: list[str]) -> np.ndarray:
    """sRGB colours in [0, 1] for world positions on the given objects, shape (..., 3)."""
    p = np.asarray(positions, dtype=np.float64)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    base = np.array([_BASE_COLOURS.get(name, (0.6, 0.6, 0.6)) for name in object_names])
    colour = base[np.clip(object_ids, 0, len(object_names) - 1)]
    # Per-object patterns: each a smooth periodic function of position, scaled around 1.
    patterns = {
        "floor": 0.80 + 0.2 * np.sin(2 * np.pi * y / 0.5) + 0.08 * np.sin(2 * np.pi * (x + 0.3 * y) / 1.3),
        "ceiling": 0.95 + 0.05 * np.cos(2 * np.pi * x / 2.0) * np.cos(2 * np.pi * y / 2.0),
        "walls": 0.85 + 0.12 * np.sin(2 * np.pi * (x + y) / 0.6) * np.sin(2 * np.pi * z / 0.9)
        + 0.08 * np.cos(2 * np.pi * z / 2.8),
        "table": 0.85 + 0.15 * np.sin(2 * np.pi * (x + 0.2 * np.sin(3 * y)) / 0.25),
        "cabinet": 0.85 + 0.15 * np.tanh(3.0 * np.sin(2 * np.pi * z / 0.9)),
        "sofa": 0.85 + 0.1 * np.sin(2 * np.pi * x / 0.35) * np.sin(2 * np.pi * z / 0.35),
        "column": 0.85 + 0.15 * np.sin(2 * np.pi * z / 0.3),
        "ball": 0.85 + 0.15 * np.sin(2 * np.pi * (x - y) / 0.3),
        "lamp": np.ones_like(x),
    }
    shade = np.ones_like(x)
    for index, name in enumerate(object_names):
        mask = object_ids == index
        if name in patterns:
            shade = np.where(mask, patterns[name], shade)
    tint = 0.06 * np.stack([np.sin(x * 1.7 + 1), np.sin(y * 1.3 + 2), np.sin(z * 1.1 + 3)], axis=-1)
    return np.clip(colour * shade[..., None] + tint, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TexturedRoom:
    """The demo room unwrapped into one atlas, with its ground-truth texture painted in."""

    room: DemoRoom
    atlas: Atlas
    surface: TexelSurface
    texture: np.ndarray  # uint8 (S, S, 3), gutters padded so bilinear lookups at chart edges stay clean


def textured_demo_room(size: int = 1024, padding: int = 4) -> TexturedRoom:
    room = build_demo_room()
    atlas = ensure_uvs(room.mesh, resolution=size, padding=padding)
    surface = rasterize_uv(atlas.mesh, size)
    ids = np.where(surface.covered, atlas.mesh.object_ids[np.maximum(surface.triangle, 0)], 0)
    colours = ground_truth_colours(surface.position, ids, room.object_names)
    colours[~surface.covered] = 0.0
    # Grow every island over the whole gutter, as a baked texture would be.
    _, (rows, cols) = ndimage.distance_transform_edt(~surface.covered, return_indices=True)
    colours = colours[rows, cols]
    return TexturedRoom(room, atlas, surface, np.clip(np.rint(colours * 255), 0, 255).astype(np.uint8))
