"""Write tiny random-weight SD 2 models: ``python -m backend make-tiny-model DIR``.

The folders (``depth/``, ``base/``, ``inpaint/``) have the layout of the official SD 2 repositories,
so anything that takes a model folder can be tried offline in seconds. Their output is noise.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder to write depth/, base/ and inpaint/ into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")


def run(args: argparse.Namespace) -> int:
    from .models.loading import KIND_IN_CHANNELS
    from .models.tiny import write_tiny_models

    written = write_tiny_models(args.directory, seed=args.seed)
    for kind, folder in written.items():
        print(f"{kind}: {folder} (UNet in_channels {KIND_IN_CHANNELS[kind]})")
    return 0
