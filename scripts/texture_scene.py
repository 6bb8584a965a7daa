"""Texture objects of a .blend headless, through the add-on, and optionally save the result.

    blender -b scene.blend --python scripts/texture_scene.py -- --prompt "a cosy cabin" --cameras orbit
    python scripts/texture_scene.py scene.blend -- --objects Floor Walls --prompt "..." --models tiny

Prints progress lines, then one JSON object on the last line (texture path, objects, ok, message);
the exit code is 0 only when the texture was applied.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import bpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_cli  # noqa: E402

CAMERA_SOURCES = {"selected": "SELECTED", "animated": "ANIMATED", "orbit": "ORBIT", "walk": "WALK"}


def add_arguments(parser) -> None:
    parser.add_argument("--objects", nargs="+", help="mesh objects to texture (default: every visible mesh)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--cameras", choices=sorted(CAMERA_SOURCES), default="selected",
                        help="selected: the cameras named by --camera-names (default: every camera)")
    parser.add_argument("--camera-names", nargs="+", help="camera objects for --cameras selected")
    parser.add_argument("--camera", help="the animated camera for --cameras animated (default: the scene camera)")
    parser.add_argument("--frames", nargs=3, type=int, metavar=("START", "END", "STEP"))
    parser.add_argument("--orbit-views", type=int)
    parser.add_argument("--orbit-rings", type=int)
    parser.add_argument("--orbit-elevation", type=float, help="degrees")
    parser.add_argument("--walk-curve", help="curve object for --cameras walk")
    parser.add_argument("--walk-views", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    blender_cli.add_scheduler_argument(parser)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--texture-size", choices=("256", "512", "1024", "2048", "4096"))
    parser.add_argument("--uv", choices=("active", "unwrap"), help="bake into the active UV map, or unwrap")


def _object(name: str, kind: str) -> bpy.types.Object:
    obj = bpy.data.objects.get(name)
    if obj is None:
        raise SystemExit(f"No object named {name!r} in {bpy.data.filepath or 'the scene'}")
    if kind and obj.type != kind:
        raise SystemExit(f"{name!r} is a {obj.type}, not a {kind}")
    return obj


def configure(args, settings) -> list[bpy.types.Object]:
    """Settings from the arguments; returns what must be selected for the operator."""
    scene = bpy.context.scene
    if args.objects:
        targets = [_object(name, "MESH") for name in args.objects]
    else:
        targets = [o for o in scene.objects if o.type == "MESH" and not o.hide_render]
    settings.prompt = args.prompt
    for option, prop in (("negative_prompt", "negative_prompt"), ("scheduler", "scheduler"), ("steps", "steps"),
                         ("guidance", "guidance"), ("seed", "seed"), ("width", "width"), ("height", "height"),
                         ("texture_size", "texture_size"), ("orbit_views", "orbit_views"),
                         ("orbit_rings", "orbit_rings"), ("walk_views", "walk_views")):
        value = getattr(args, option)
        if value is not None:
            setattr(settings, prop, value)
    if args.orbit_elevation is not None:
        settings.orbit_elevation = math.radians(args.orbit_elevation)
    if args.uv:
        settings.uv_source = args.uv.upper()
    settings.camera_source = CAMERA_SOURCES[args.cameras]
    selection = list(targets)
    if args.cameras == "selected":
        names = args.camera_names
        selection += [_object(n, "CAMERA") for n in names] if names else [
            o for o in scene.objects if o.type == "CAMERA"]
    elif args.cameras == "animated":
        if args.camera:
            settings.animated_camera = _object(args.camera, "CAMERA")
        if args.frames:
            settings.frame_start, settings.frame_end, settings.frame_step = args.frames
    elif args.cameras == "walk":
        if not args.walk_curve:
            raise SystemExit("--cameras walk needs --walk-curve")
        settings.walk_curve = _object(args.walk_curve, "CURVE")
    return selection


def main() -> int:
    args, _addon = blender_cli.setup(__doc__.splitlines()[0], add_arguments)
    settings = bpy.context.scene.mvdiff
    selection = configure(args, settings)
    blender_cli.apply_output_arguments(settings, args, "result_name")
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj in selection)
    if selection:
        bpy.context.view_layer.objects.active = selection[0]
    result = bpy.ops.mvdiff.texture()
    textured = [o.name for o in selection if o.type == "MESH"]
    return blender_cli.finish(result, args, {"objects": textured})


if __name__ == "__main__":
    sys.exit(main())
