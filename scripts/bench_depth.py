"""Benchmark the add-on's Cycles depth renders on the demo room.

    .venv/bin/python scripts/bench_depth.py --json [--poses 100 --width 256 --height 192]

Builds the demo room in the bpy module, renders depth along the demo trajectory through the
add-on's own ``render_depths`` and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import blender_addon  # noqa: E402

blender_addon.isolate_user_resources()

import blender_demo_room  # noqa: E402
import bpy  # noqa: E402
import numpy as np  # noqa: E402


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poses", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)

    addon = blender_addon.enable_addon()
    bpy.ops.wm.read_homefile(use_empty=True)
    start = time.perf_counter()
    objects = blender_demo_room.build_demo_room_objects(bpy)
    build_seconds = time.perf_counter() - start
    triangles = 0
    for obj in objects:
        obj.data.calc_loop_triangles()
        triangles += len(obj.data.loop_triangles)
    poses = blender_demo_room.demo_poses(args.poses, args.width, args.height, pose_class=addon.cameras.Pose)
    scene = bpy.context.scene
    with tempfile.TemporaryDirectory(prefix="mvdiff-bench-depth-") as work:
        start = time.perf_counter()
        depths = addon.render_depth.render_depths(scene, poses, args.width, args.height, Path(work) / "depth")
        total = time.perf_counter() - start
    result = {
        "benchmark": "depth",
        "blender": bpy.app.version_string,
        "poses": args.poses,
        "width": args.width,
        "height": args.height,
        "triangles": triangles,
        "seconds_total": round(total, 4),
        "seconds_per_pose": round(total / args.poses, 5),
        "seconds_build_scene": round(build_seconds, 4),
        "hit_fraction": round(float(np.mean(depths > 0)), 4),
        "threads": scene.render.threads,
    }
    return result


if __name__ == "__main__":
    out = main(blender_addon.script_args())
    sys.stdout.flush()
    print(json.dumps(out) if "--json" in blender_addon.script_args() else
          "\n".join(f"{k}: {v}" for k, v in out.items()))
