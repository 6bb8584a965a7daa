"""``python -m backend train --config RECIPE.json [--out RUN]``: train MVDiffusion's stages in a run folder.

The recipe (:class:`~backend.train.config.TrainConfig`, e.g. ``backend/train/recipes/tiny_depth.json``)
says what to train; the run folder keeps the state: run the same command again and an
interrupted run continues from its last checkpoint. A progress bar shows each stage, the loss
log goes to ``RUN/log.jsonl``, and the trained model lands in ``RUN/model/depth`` (a diffusers
folder with ``caa.safetensors``), ready for ``--models RUN/model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="training recipe (JSON), e.g. backend/train/recipes/tiny_depth.json")
    parser.add_argument("--out", help="run folder (default: runs/<recipe name>); an existing run resumes")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimisation steps (a checkpoint is saved; run again to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--data", nargs=2, metavar=("KIND", "DIR"),
                        help="train on a released data set instead of the recipe's synthetic rooms: "
                             "'scannet DIR' (ScanNet scenes, the released layout; DIR/train when it exists)")


def run(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import Trainer

    config = TrainConfig.load(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    samples = released_samples(config, *args.data) if args.data else None
    trainer = Trainer(config, out, train_data=samples, multi_view_data=samples, progress=not args.no_progress,
                      log=print)
    if trainer.state.step or trainer.state.completed:
        print(f"Resuming {out}: stage {trainer.state.stage}, step {trainer.state.step}")
    report = trainer.run(max_steps=args.max_steps)
    print(json.dumps(report, indent=1))
    if report["finished"]:
        print(f"Trained model in {report['model']} (use --models {out / 'model'}); loss log in {out / 'log.jsonl'}")
    else:
        print(f"Stopped at stage {report['stage']}, step {report['step']}; run the same command to continue")
    return 0


DATA_KINDS = ("scannet",)


def released_samples(config, kind: str, folder: str):
    """The training samples of a released data set in ``folder``, at the recipe's view count and size."""
    from ..validation import InputError
    from .released_data import ScanNetScenes

    if kind == "mp3d":  # Matterport3D skyboxes (released_data.MatterportSkybox) are panorama samples
        raise InputError("data", "mp3d holds panorama views; the trainer trains the depth model only")
    if kind not in DATA_KINDS:
        raise InputError("data", f"must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    root = Path(folder)
    if not root.is_dir():
        raise InputError("data", f"no such folder: {root}")
    d = config.data
    split = "train" if (root / "train").is_dir() else None
    return ScanNetScenes(root, split, views=d.views, width=d.width, height=d.height)
