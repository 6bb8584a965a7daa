"""Make a 360 HDRI World for a .blend headless, through the add-on, and optionally save it.

    blender -b scene.blend --python scripts/make_hdri.py -- --prompt "a misty pine forest at dawn"
    python scripts/make_hdri.py scene.blend -- --prompt "..." --models tiny --save out/scene.blend

Without a .blend (standalone) it starts from an empty scene. Prints progress lines, then one
JSON object on the last line (panorama path, World, ok, message, or ``{"ok": false, "error": ...}``
with exit code 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import bpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_cli  # noqa: E402


def add_arguments(parser) -> None:
    setting = blender_cli.setting_help
    parser.add_argument("--prompt", required=True, help="what the 360 environment should show")
    parser.add_argument("--negative-prompt", help=setting("what it should not show", "negative_prompt"))
    blender_cli.add_scheduler_argument(parser)
    parser.add_argument("--steps", type=int, help=setting("denoising steps", "steps"))
    parser.add_argument("--guidance", type=float, help=setting("classifier-free guidance scale", "guidance"))
    parser.add_argument("--seed", type=int, help=setting("random seed", "seed"))
    parser.add_argument("--height", type=int, help=setting("equirect height in pixels (width is twice)",
                                                           "world_height"))
    parser.add_argument("--view-size", type=int, help=setting("size of each generated view, a multiple of 64",
                                                              "world_view_size"))
    parser.add_argument("--strength", type=float, help=setting("World background strength", "world_strength"))
    parser.add_argument("--use-current-world", action="store_true",
                        help="put it into the scene's World instead of a new one (the old World is kept either way)")


def main() -> int:
    args, _addon = blender_cli.setup(__doc__.splitlines()[0], add_arguments)
    settings = bpy.context.scene.mvdiff
    settings.world_prompt = args.prompt
    for option, prop in (("negative_prompt", "negative_prompt"), ("scheduler", "scheduler"), ("steps", "steps"),
                         ("guidance", "guidance"), ("seed", "seed"), ("height", "world_height"),
                         ("view_size", "world_view_size"),
                         ("strength", "world_strength")):
        value = getattr(args, option)
        if value is not None:
            setattr(settings, prop, value)
    settings.world_replace_current = args.use_current_world
    blender_cli.apply_output_arguments(settings, args, "world_result_name")
    result = bpy.ops.mvdiff.make_world()
    world = bpy.context.scene.world
    return blender_cli.finish(result, args, {"world": world.name if world else None})


if __name__ == "__main__":
    sys.exit(blender_cli.run(main))
