"""What the headless scripts share: arguments after ``--``, opening the .blend, backend settings.

The scripts run two ways with the same arguments:

    blender -b scene.blend --python scripts/texture_scene.py -- --prompt ...
    python scripts/texture_scene.py scene.blend -- --prompt ...      (the ``bpy`` module)

In the second form this module opens the .blend itself, and ``--help`` works without ``--``.

Every run ends with one JSON line: the summary with ``"ok": true``, or ``{"ok": false, "error": ...}``
and exit code 1 for every refusal and error (see :func:`run`), so callers never parse a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import bpy

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from blender_addon import enable_addon  # noqa: E402


def standalone() -> bool:
    """True under the ``bpy`` module (no Blender binary): the script opens the .blend itself."""
    return not bpy.app.binary_path


class ScriptError(Exception):
    """A refusal the script reports as ``{"ok": false, "error": ...}`` with exit code 1."""


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the .blend to open in standalone mode, the script's own arguments).

    Inside Blender the script's arguments follow ``--`` (Blender reads the others). Standalone,
    everything but the .blend is the script's, before or after ``--``.
    """
    ours = argv[argv.index("--") + 1:] if "--" in argv else []
    blend = None
    if standalone():
        before = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        blends = [a for a in before if a.endswith(".blend")]
        blend = blends[0] if blends else None
        ours = [a for a in before if a != blend] + ours
    return blend, ours


def run(main: Callable[[], int]) -> int:
    """Run a script's ``main``: any refusal or error becomes the last line ``{"ok": false, "error": ...}``
    and exit code 1 (Blender itself would exit 0 after an uncaught error in ``--python``)."""
    try:
        return main()
    except SystemExit as done:  # argparse: --help (0) and usage errors (2, message already printed)
        if done.code in (0, None):
            return 0
        if isinstance(done.code, int):
            return _fail("invalid arguments (see the usage above)")
        return _fail(str(done.code))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as err:  # noqa: BLE001 - every error must reach the caller as the JSON line
        if not isinstance(err, ScriptError | RuntimeError):
            traceback.print_exc()
        return _fail(str(err).strip() or type(err).__name__)


def _fail(message: str) -> int:
    # bpy.ops turns an operator's error report into "Error: <message>"
    message = message.removeprefix("Error: ").strip()
    print(json.dumps({"ok": False, "error": message}), flush=True)
    return 1


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has one of its own (the others name theirs in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += f" (default: {action.default})"
        return text


def scene_default(prop: str) -> str:
    """The add-on's default for a scene setting (what a new file has), for the scripts' help."""
    group = bpy.types.Scene.bl_rna.properties["mvdiff"].fixed_type
    value = group.properties[prop].default
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_help(text: str, prop: str) -> str:
    return f"{text} (default: the file's setting; {scene_default(prop)} in a new file)"


def add_scheduler_argument(parser: argparse.ArgumentParser) -> None:
    """``--scheduler``, with the backend's scheduler names (this checkout's ``backend/sampling_options.py``)."""
    root = str(SCRIPTS.parent)
    if root not in sys.path:
        sys.path.append(root)
    from backend.sampling_options import SCHEDULERS, scheduler_summary

    parser.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help=setting_help(f"denoising scheduler: {scheduler_summary()}", "scheduler"))


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend (default: the add-on's preferences)")
    group.add_argument("--url", help="connect to a running backend at this URL instead of starting one")
    group.add_argument("--token", help="access token for --url")
    group.add_argument("--python", help="Python that runs a local backend (default: this checkout's .venv)")
    group.add_argument("--models", help="'tiny' (offline random weights), a folder with depth/ and base/, or 'hub'")
    group.add_argument("--depth-caa", help="multi-view block weights for texturing")
    group.add_argument("--panorama-caa", help="multi-view block weights for panoramas")
    group.add_argument("--device", choices=("auto", "cuda", "cpu"))
    group.add_argument("--port", type=int, help="port of the local backend")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="folder for the results (default: next to the .blend, or ~/MVDiffusion "
                                         "for a new file)")
    parser.add_argument("--name", help="file name of the results, without extension (default: the .blend's name, "
                                       "the kind of job and the time)")
    parser.add_argument("--save", help="save the .blend here afterwards (default: do not save)")


def setup(description: str, add_arguments) -> tuple[argparse.Namespace, object]:
    """Parse arguments, open the .blend in standalone mode, enable the add-on and configure its backend."""
    blend, ours = split_argv(sys.argv)
    addon = enable_addon()  # first: the help names the add-on's defaults
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=description,
                                     formatter_class=_HelpFormatter)
    add_arguments(parser)
    add_backend_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args(ours)
    if blend is not None:
        path = Path(blend).resolve()
        if not path.is_file():
            raise ScriptError(f"no .blend file at {path}")
        bpy.ops.wm.open_mainfile(filepath=str(path))
    configure_backend(addon, args)
    return args, addon


def configure_backend(addon, args: argparse.Namespace) -> None:
    from importlib import import_module

    prefs = import_module(f"{addon.__name__}.preferences").get(bpy.context)
    if prefs is None:
        raise ScriptError("The add-on's preferences are missing: is it installed as an extension?")
    if args.url:
        prefs.mode, prefs.url = "REMOTE", args.url
        if args.token:
            prefs.token = args.token
        return
    prefs.mode = "LOCAL"
    if args.python:
        prefs.python = args.python
    elif standalone() and not prefs.python:
        prefs.python = sys.executable  # the bpy module's Python has the backend's packages in this checkout
    if args.models:
        if args.models == "tiny":
            prefs.model_source = "TINY"
        elif args.models == "hub":
            prefs.model_source = "HUB"
        else:
            prefs.model_source, prefs.model_folder = "FOLDER", str(Path(args.models).resolve())
    if args.depth_caa:
        prefs.depth_caa = str(Path(args.depth_caa).resolve())
    if args.panorama_caa:
        prefs.panorama_caa = str(Path(args.panorama_caa).resolve())
    if args.device:
        prefs.device = args.device.upper()
    if args.port:
        prefs.port = args.port


def apply_output_arguments(settings, args: argparse.Namespace, name_property: str) -> None:
    if args.output:
        folder = Path(args.output).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        settings.output_dir = str(folder)
    if args.name:
        setattr(settings, name_property, args.name)


def finish(result: set, args: argparse.Namespace, summary: dict) -> int:
    """Save when asked, print the summary as JSON on the last line, and return the exit code."""
    state = bpy.context.window_manager.mvdiff
    ok = result == {"FINISHED"}
    if not ok:
        raise ScriptError(state.message or f"the operator ended with {sorted(result)}")
    if args.save:
        path = Path(args.save).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=False)
        summary["blend"] = str(path)
    summary.update(ok=True, message=state.message, result=state.result_path)
    print(json.dumps(summary), flush=True)
    return 0
