"""Texture objects of a .blend headless, through the add-on, and optionally save the result.

    blender -b scene.blend --python scripts/texture_scene.py -- --prompt "a cosy cabin" --cameras orbit
    python scripts/texture_scene.py scene.blend -- --objects Floor Walls --prompt "..." --models tiny

Prints progress lines, then one JSON object on the last line (texture path, objects, ok, message,
or ``{"ok": false, "error": ...}``); the exit code is 0 only when the texture was applied.
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
    setting = blender_cli.setting_help
    parser.add_argument("--objects", nargs="+", help="mesh objects to texture (default: every visible mesh)")
    parser.add_argument("--prompt", required=True, help="what the textures should show")
    parser.add_argument("--negative-prompt", help=setting("what the textures should not show", "negative_prompt"))
    parser.add_argument("--cameras", choices=sorted(CAMERA_SOURCES), default="selected",
                        help="where the poses come from; selected: the cameras named by --camera-names")
    parser.add_argument("--camera-names", nargs="+", help="camera objects for --cameras selected (default: every "
                                                          "camera)")
    parser.add_argument("--camera", help="the animated camera for --cameras animated (default: the scene camera)")
    parser.add_argument("--frames", nargs=3, type=int, metavar=("START", "END", "STEP"),
                        help="frame range for --cameras animated (default: the file's setting; "
                             f"{' '.join(map(blender_cli.scene_default, ('frame_start', 'frame_end', 'frame_step')))}"
                             " in a new file)")
    parser.add_argument("--orbit-views", type=int, help=setting("cameras per orbit ring", "orbit_views"))
    parser.add_argument("--orbit-rings", type=int, help=setting("orbit rings", "orbit_rings"))
    parser.add_argument("--orbit-elevation", type=float,
                        help="elevation of the highest ring in degrees (default: the file's setting; "
                             f"{math.degrees(float(blender_cli.scene_default('orbit_elevation'))):.0f} in a new file)")
    parser.add_argument("--walk-curve", help="curve object for --cameras walk")
    parser.add_argument("--walk-views", type=int, help=setting("cameras along the walk curve", "walk_views"))
    parser.add_argument("--width", type=int, help=setting("view width in pixels, a multiple of 64", "width"))
    parser.add_argument("--height", type=int, help=setting("view height in pixels, a multiple of 64", "height"))
    blender_cli.add_scheduler_argument(parser)
    parser.add_argument("--steps", type=int, help=setting("denoising steps", "steps"))
    parser.add_argument("--guidance", type=float, help=setting("classifier-free guidance scale", "guidance"))
    parser.add_argument("--seed", type=int, help=setting("random seed", "seed"))
    parser.add_argument("--texture-size", choices=("256", "512", "1024", "2048", "4096"),
                        help=setting("texture width and height", "texture_size"))
    parser.add_argument("--uv", choices=("active", "unwrap"),
                        help=setting("bake into the active UV map, or unwrap", "uv_source"))
    parser.add_argument("--make-single-user", action="store_true",
                        help="give textured objects that share a mesh with others their own copy")


def _object(name: str, kind: str) -> bpy.types.Object:
    obj = bpy.data.objects.get(name)
    if obj is None:
        raise blender_cli.ScriptError(f"No object named {name!r} in {bpy.data.filepath or 'the scene'}")
    if kind and obj.type != kind:
        raise blender_cli.ScriptError(f"{name!r} is a {obj.type}, not a {kind}")
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
    if args.make_single_user:
        settings.make_single_user = True
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
            raise blender_cli.ScriptError("--cameras walk needs --walk-curve")
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
    sys.exit(blender_cli.run(main))
