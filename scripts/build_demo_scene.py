"""Write the demo room as a .blend: its furnished box as mesh objects and the demo camera loop.

    python scripts/build_demo_scene.py out/demo_scene.blend --views 12

The cameras (``View_000``...) are the backend's demo trajectory, so the texture job that
``scripts/demo.sh`` runs on this file sees the room as the backend's own tests do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_addon  # noqa: E402

blender_addon.isolate_user_resources()

import bpy  # noqa: E402
from blender_demo_room import build_demo_room_objects, demo_poses  # noqa: E402
from mathutils import Matrix  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("blend", help="the .blend to write")
    parser.add_argument("--views", type=int, default=12, help="cameras along the loop")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    args = parser.parse_args(blender_addon.script_args())
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = args.width, args.height
    build_demo_room_objects(bpy)
    cameras = bpy.data.collections.new("Demo Cameras")
    scene.collection.children.link(cameras)
    for index, pose in enumerate(demo_poses(args.views, args.width, args.height)):
        data = bpy.data.cameras.new(f"View_{index:03d}")
        data.lens, data.sensor_fit = pose["lens"], pose["sensor_fit"]
        data.sensor_width, data.sensor_height = pose["sensor_width"], pose["sensor_height"]
        data.clip_start, data.clip_end = 0.01, 100.0
        obj = bpy.data.objects.new(f"View_{index:03d}", data)
        obj.matrix_world = Matrix(pose["matrix_world"].tolist())
        cameras.objects.link(obj)
    scene.camera = bpy.data.objects["View_000"]
    path = Path(args.blend).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    print(f"Wrote {path}: {len(bpy.data.meshes)} meshes, {args.views} cameras")
    return 0


if __name__ == "__main__":
    sys.exit(main())
