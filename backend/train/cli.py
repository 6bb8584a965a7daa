"""``python -m backend train --config RECIPE.json [--out RUN]``: train MVDiffusion's stages in a run folder.

The recipe (:class:`~backend.train.config.TrainConfig`, e.g. ``backend/train/recipes/tiny_depth.json``)
says what to train; the run folder keeps the state: run the same command again and an
interrupted run continues from its last checkpoint. A progress bar shows each stage, the loss
log goes to ``RUN/log.jsonl``, and the trained model lands in ``RUN/model/depth`` (a diffusers
folder with ``caa.safetensors``; ``RUN/model/base`` for the panorama task), ready for
``--models RUN/model``.

``--data KIND DIR`` trains on a released data set instead of the recipe's synthetic data, and the
data set picks the task: ``scannet`` (scene trajectories) the depth model, ``mp3d`` (Matterport3D
skyboxes, 8 ring views) the panorama model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

DATA_TASKS = {"scannet": "depth", "mp3d": "panorama"}
"""The released data sets ``--data`` reads, and the task each one trains."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="training recipe (JSON), e.g. backend/train/recipes/tiny_depth.json")
    parser.add_argument("--out", help="run folder (default: runs/<recipe name>); an existing run resumes")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimisation steps (a checkpoint is saved; run again to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--data", nargs=2, metavar=("KIND", "DIR"),
                        help="train on a released data set instead of the recipe's synthetic data; it sets the task: "
                             "'scannet DIR' (ScanNet scenes, the released layout; DIR/train when it exists) trains "
                             "the depth model, 'mp3d DIR' (Matterport3D skyboxes: DIR/train.npy and the scene "
                             "folders) the panorama model")


def run(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import Trainer

    config = TrainConfig.load(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    samples = None
    if args.data:
        config = data_task(config, args.data[0])
        samples = released_samples(config, *args.data)
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


def data_task(config, kind: str):
    """The recipe with the task the data set ``kind`` trains (the rest of the recipe unchanged)."""
    from ..validation import InputError

    if kind not in DATA_TASKS:
        raise InputError("data", f"must be one of {', '.join(DATA_TASKS)}, got {kind!r}")
    task = DATA_TASKS[kind]
    if config.task == task:
        return config
    print(f"{kind} trains the {task} model: task {config.task!r} of the recipe replaced by {task!r}")
    config = dataclasses.replace(config, task=task)
    config.validate()
    return config


def released_samples(config, kind: str, folder: str):
    """The training samples of a released data set in ``folder``, at the recipe's view count and size."""
    from ..validation import InputError
    from .released_data import RING_VIEWS, MatterportSkybox, ScanNetScenes

    if kind not in DATA_TASKS:
        raise InputError("data", f"must be one of {', '.join(DATA_TASKS)}, got {kind!r}")
    root = Path(folder)
    if not root.is_dir():
        raise InputError("data", f"no such folder: {root}")
    d = config.data
    if kind == "mp3d":
        if not (root / "train.npy").is_file():
            raise InputError("data", f"{root} holds no train.npy (the Matterport3D skybox list)")
        if d.views != RING_VIEWS:
            raise InputError("data.views", f"Matterport3D samples have {RING_VIEWS} views, got {d.views}")
        return MatterportSkybox(root, "train", view_size=d.width, seed=d.seed)
    split = "train" if (root / "train").is_dir() else None
    return ScanNetScenes(root, split, views=d.views, width=d.width, height=d.height)
