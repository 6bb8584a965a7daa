"""Command line: ``python -m backend COMMAND``.

Commands import their heavy dependencies lazily, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .validation import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="MVDiffusion texturing backend")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    from . import bench, cli_jobs, cli_models, demo

    cli_train = _training_cli()
    if cli_train is None and (sys.argv[1:] if argv is None else argv)[:1] == ["train"]:
        print("error: training is not part of the extension build; run it from a checkout of the repository",
              file=sys.stderr)
        return 2

    bench.add_arguments(commands.add_parser("bench", help="run a benchmark", description=bench.__doc__))
    demo.add_arguments(commands.add_parser("demo", help="run the offline demo", description=demo.__doc__))
    cli_models.add_arguments(
        commands.add_parser("make-tiny-model", help="write tiny random SD 2 models", description=cli_models.__doc__)
    )
    cli_jobs.add_serve_arguments(
        commands.add_parser("serve", help="run the HTTP backend", description=cli_jobs.__doc__)
    )
    cli_jobs.add_texture_arguments(
        commands.add_parser("texture", help="run a texture job here", description=cli_jobs.__doc__)
    )
    cli_jobs.add_panorama_arguments(
        commands.add_parser("panorama", help="make a 360 HDRI here", description=cli_jobs.__doc__)
    )
    if cli_train is not None:
        cli_train.add_arguments(
            commands.add_parser("train", help="train the multi-view model (two stages)", description=cli_train.__doc__)
        )
    args = parser.parse_args(argv)
    handlers = {
        "bench": bench.run, "demo": demo.run, "make-tiny-model": cli_models.run,
        "serve": cli_jobs.run_serve, "texture": cli_jobs.run_texture, "panorama": cli_jobs.run_panorama,
        "train": cli_train.run if cli_train else None,
    }
    try:
        return handlers[args.command](args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _training_cli():
    """The ``train`` command's module; None in the extension build, which ships without ``backend/train``."""
    try:
        from .train import cli
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.train":
            raise
        return None
    return cli


if __name__ == "__main__":
    sys.exit(main())
