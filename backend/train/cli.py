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


def run(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import Trainer

    config = TrainConfig.load(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    trainer = Trainer(config, out, progress=not args.no_progress, log=print)
    if trainer.state.step or trainer.state.completed:
        print(f"Resuming {out}: stage {trainer.state.stage}, step {trainer.state.step}")
    report = trainer.run(max_steps=args.max_steps)
    print(json.dumps(report, indent=1))
    if report["finished"]:
        print(f"Trained model in {report['model']} (use --models {out / 'model'}); loss log in {out / 'log.jsonl'}")
    else:
        print(f"Stopped at stage {report['stage']}, step {report['step']}; run the same command to continue")
    return 0
