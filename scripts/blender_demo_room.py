"""The backend's demo room as Blender objects, for tests and benchmarks that run under the bpy module.

The room is built once in numpy (``backend.scenes.demo_room``) and copied into Blender with
``foreach_set``, so Blender renders exactly the triangles the backend rasterises. This script is
not part of the add-on: it may import the backend's scene helpers (scipy and all).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from backend.geometry.cameras import Camera  # noqa: E402
from backend.scenes.demo_room import build_demo_room, trajectory  # noqa: E402

# The sensor width the demo poses use; any value works as long as lens is scaled with it.
SENSOR_WIDTH = 36.0


def mesh_object(bpy, name: str, vertices: np.ndarray, triangles: np.ndarray):
    """A new mesh object from world-space vertices (N, 3) and triangles (M, 3), linked to the scene."""
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    triangles = np.ascontiguousarray(triangles, dtype=np.int32)
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(vertices))
    me.vertices.foreach_set("co", vertices.ravel())
    me.loops.add(triangles.size)
    me.loops.foreach_set("vertex_index", triangles.ravel())
    me.polygons.add(len(triangles))
    me.polygons.foreach_set("loop_start", np.arange(0, triangles.size, 3, dtype=np.int32))
    me.update(calc_edges=True)
    me.validate()
    obj = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def build_demo_room_objects(bpy) -> list:
    """One mesh object per object of the demo room (named as in ``DemoRoom.object_names``)."""
    room = build_demo_room()
    mesh = room.mesh
    objects = []
    for index, name in enumerate(room.object_names):
        triangles = mesh.triangles[mesh.object_ids == index]
        used, local = np.unique(triangles, return_inverse=True)
        objects.append(mesh_object(bpy, name, mesh.vertices[used], local.reshape(-1, 3)))
    bpy.context.view_layer.update()
    return objects


def camera_as_blender(camera: Camera) -> dict:
    """Blender camera parameters (``matrix_world`` and lens data) equivalent to a centred backend camera.

    Only cameras with a centred principal point and square pixels (as ``trajectory`` makes) have
    an exact Blender equivalent; others are refused rather than approximated.
    """
    K, width, height = camera.K, camera.width, camera.height
    if not (np.isclose(K[0, 0], K[1, 1]) and np.isclose(K[0, 2], (width - 1) / 2)
            and np.isclose(K[1, 2], (height - 1) / 2) and K[0, 1] == 0):
        raise ValueError("only centred cameras with square pixels have a plain Blender equivalent")
    return dict(
        matrix_world=camera.to_blender_matrix_world(),
        lens=SENSOR_WIDTH * K[0, 0] / width,
        sensor_width=SENSOR_WIDTH,
        sensor_height=SENSOR_WIDTH * height / width,
        sensor_fit="HORIZONTAL",
        shift_x=0.0,
        shift_y=0.0,
    )


def demo_poses(count: int, width: int = 256, height: int = 192, pose_class=None) -> list:
    """Poses along the demo trajectory: the add-on's ``Pose`` when ``pose_class`` is given, else dicts."""
    poses = []
    for camera in trajectory(count, width=width, height=height):
        params = camera_as_blender(camera)
        if pose_class is not None:
            params = pose_class(clip_start=0.01, clip_end=1000.0, **params)
        poses.append(params)
    return poses


def demo_cameras(count: int, width: int = 256, height: int = 192) -> list[Camera]:
    """The backend's own cameras of the demo trajectory (the reference the poses must match)."""
    return trajectory(count, width=width, height=height)


def horizontal_fov_lens(fov_deg: float, sensor_width: float = SENSOR_WIDTH) -> float:
    """Focal length in mm giving ``fov_deg`` across ``sensor_width``."""
    return 0.5 * sensor_width / math.tan(math.radians(fov_deg) / 2.0)
