"""Command line: ``python -m backend COMMAND``.

Commands import their heavy dependencies lazily, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .validation import InputError

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    # name: (module, function adding its arguments, function running it, help)
    "bench": (".bench", "add_arguments", "run", "run a benchmark"),
    "demo": (".demo", "add_arguments", "run", "run the offline demo"),
    "models": (".cli_models", "add_models_arguments", "run_models", "list, download and verify models"),
    "make-tiny-model": (".cli_models", "add_arguments", "run", "write tiny random SD 2 models"),
    "serve": (".cli_jobs", "add_serve_arguments", "run_serve", "run the HTTP backend"),
    "texture": (".cli_jobs", "add_texture_arguments", "run_texture", "run a texture job here"),
    "panorama": (".cli_jobs", "add_panorama_arguments", "run_panorama", "make a 360 HDRI here"),
    "train": (".train.cli", "add_arguments", "run", "train the multi-view model (two stages)"),
}
"""Only the chosen command's module is imported, so ``models --help`` answers without loading torch."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m backend", description="MVDiffusion texturing backend")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    for name, (module_name, add, _, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text)
        if name == chosen:
            module = _command_module(module_name)
            if module is None:
                print("error: training is not part of the extension build; run it from a checkout of the repository",
                      file=sys.stderr)
                return 2
            sub.description = module.__doc__
            getattr(module, add)(sub)
    args = parser.parse_args(argv)
    try:
        return getattr(module, COMMANDS[args.command][2])(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _command_module(name: str):
    """A command's module; None for training in the extension build, which ships without ``backend/train``."""
    try:
        return importlib.import_module(name, __package__)
    except ModuleNotFoundError as err:
        if name == ".train.cli" and err.name == f"{__package__}.train":
            return None
        raise


if __name__ == "__main__":
    sys.exit(main())
