"""``bench consistency``: does training CAA make generated views agree where they overlap?

Trains the tiny recipe (``backend/train/recipes/tiny_depth.json``) from scratch in a run folder, or
evaluates a run folder ``train`` already produced (``--run``), then generates held-out
trajectories (camera paths and textures never used in training) twice with the keyframe
pipeline, the code path of real jobs, from the same seed: once with CAA over the overlap graph
(views generated jointly) and once without (every view generated on its own from its own noise).
Both are scored with MVDiffusion's overlap PSNR (:func:`~backend.eval.consistency.depth_overlap_psnr`:
consecutive views, warped through depth) and divided by the overlap PSNR of the ground-truth
renders of the same poses (:func:`~backend.eval.consistency.overlap_psnr_ratio`).

``ratio_caa`` and ``ratio_no_caa`` are the ratio of means (generated mean over every scored pair
of every trajectory / ground-truth mean over the same), the paper's panorama reading;
``mean_of_ratios_*`` average the per-pair ratios instead.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..sampling_options import DEFAULT_SCHEDULER, DEFAULT_STEPS, scheduler_name
from ..validation import InputError
from . import modes_bench
from .config import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "recipes" / "tiny_depth.json"
TINY_GUIDANCE = 3.0
"""Guidance the benchmark samples the tiny recipe's model with; jobs default to the released models'
``sampling_options.DEFAULT_GUIDANCE``."""


@dataclass
class GeneratedSet:
    """Images of every held-out trajectory: ground truth, CAA on, CAA off (uint8 (V, H, W, 3) each)."""

    truth: list[np.ndarray] = field(default_factory=list)
    caa: list[np.ndarray] = field(default_factory=list)
    plain: list[np.ndarray] = field(default_factory=list)


def pooled_score(scores: list) -> SimpleNamespace:
    """Several trajectories' overlap scores as one: pairs keyed (trajectory, i, j), mean over all of them."""
    per_pair = {(k, *pair): value for k, score in enumerate(scores) for pair, value in score.per_pair.items()}
    mean = float(np.mean(list(per_pair.values()))) if per_pair else float("nan")
    return SimpleNamespace(mean=mean, per_pair=per_pair)


def run_consistency_benchmark(
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    train: bool = True,
    trajectories: int | None = None,
    steps: int = DEFAULT_STEPS,
    guidance: float = TINY_GUIDANCE,
    seed: int = 0,
    scheduler: str = DEFAULT_SCHEDULER,
    progress: bool = False,
    sheet: bool = True,
    sync_range: tuple[float, float] | None = None,
    panorama: int = 2,
) -> dict:
    """Train (``train``) or load the run in ``run_dir``, generate the held-out trajectories, score them.

    Without ``run_dir`` a temporary folder holds the run and is deleted afterwards. ``config``
    defaults to the tiny recipe when training and to the run's own ``config.json`` otherwise.
    ``scheduler`` names the sampler of ``backend.sampling_options.SCHEDULERS`` the views are made with.
    Every mode of :mod:`~backend.train.modes_bench` is scored on the same trajectories
    (``sync_range``: the synchronised share of the steps), and ``panorama`` held-out panoramas
    make its panorama row (0: none).
    """
    scheduler_name("scheduler", scheduler)  # before a training run, not after it
    import torch

    from ..engine import ModelSet
    from ..eval.consistency import depth_overlap_psnr, overlap_psnr_ratio
    from ..models.serving import ModelConfig
    from ..pipelines.sampling import SamplingSettings
    from ..pipelines.training_free import SyncSettings
    from .checkpoint import TrainState
    from .synthetic import SyntheticDepthData
    from .trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="mvdiff-consistency-") as scratch:
        run = Path(run_dir) if run_dir is not None else Path(scratch) / "run"
        if config is None:
            saved = run / "config.json"
            config = TrainConfig.load(saved if (not train and saved.is_file()) else DEFAULT_CONFIG)
        if config.task != "depth":
            raise InputError("run", f"the bench scores depth trajectories; {run} trains the {config.task} model")
        if train:
            trainer = Trainer(config, run, progress=progress, log=print if progress else None)
            trainer.run()
            del trainer
        state_path = run / "state.json"
        if not state_path.is_file():
            raise InputError("run", f"{run} holds no training run (no state.json)")
        state = TrainState.read(state_path)
        if "multi_view" not in state.completed:
            raise InputError("run", f"{run} has not finished training (stage {state.stage}, step {state.step})")

        device = "cuda" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "cpu"
        models = ModelSet(ModelConfig(root=str(run / "model"), device=device, dtype="float32", offline=True))
        sampler = models.sampler("depth")
        sync = SyncSettings(*sync_range) if sync_range is not None else SyncSettings()
        d = config.data
        count = trajectories or d.heldout
        heldout = SyntheticDepthData(count, d.views, d.width, d.height, d.seed, split="heldout",
                                     step_deg=d.step_deg)
        generated = GeneratedSet()
        modes = modes_bench.ModeImages()
        scores: dict[str, list] = {row: [] for row in modes_bench.ROWS}
        truth_scores, object_ids = [], []
        started = time.perf_counter()
        for k in range(count):
            sample = heldout[k]
            cameras, depths = sample.cameras, list(sample.depths)
            settings = SamplingSettings(steps=steps, guidance_scale=guidance, seed=seed + k, scheduler=scheduler)
            rows = modes_bench.generate_rows(sampler, sample, heldout.scene_mesh(k), settings, sync)
            generated.truth.append(sample.images)
            generated.caa.append(rows["caa"])
            generated.plain.append(rows["independent"])
            object_ids.append(sample.meta["object_ids"])
            truth_scores.append(depth_overlap_psnr(list(sample.images), cameras, depths))
            for row, images in rows.items():
                modes.images[row].append(images)
                scores[row].append(depth_overlap_psnr(list(images), cameras, depths))
        generate_seconds = time.perf_counter() - started
        truth, caa, plain = (pooled_score(s) for s in (truth_scores, scores["caa"], scores["independent"]))
        with_caa, without = overlap_psnr_ratio(caa, truth), overlap_psnr_ratio(plain, truth)
        pooled = {row: pooled_score(s) for row, s in scores.items()}
        mode_results = modes_bench.row_results(truth, pooled, modes, generated.truth, object_ids)
        panorama_results = {}
        if panorama:
            settings = SamplingSettings(steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler)
            panorama_results = modes_bench.panorama_row(sampler, panorama, settings, sync, view_size=d.width)
        if sheet:
            _write_sheet(run / "consistency_sheet.png", generated)
        stage_seconds = {name: round(value, 2) for name, value in state.seconds.items()}
        result = {
            "benchmark": "consistency",
            "ratio_caa": round(with_caa["ratio_of_means"], 4),
            "ratio_no_caa": round(without["ratio_of_means"], 4),
            "ratio_gap": round(with_caa["ratio_of_means"] - without["ratio_of_means"], 4),
            **mode_results,
            "sync_range": [sync.start, sync.stop],
            **panorama_results,
            "mean_of_ratios_caa": round(with_caa["mean_of_ratios"], 4),
            "mean_of_ratios_no_caa": round(without["mean_of_ratios"], 4),
            "psnr_caa_db": round(caa.mean, 3),
            "psnr_no_caa_db": round(plain.mean, 3),
            "psnr_truth_db": round(truth.mean, 3),
            "views": d.views,
            "trajectories": count,
            "pairs": with_caa["shared_pairs"],
            "view_size": [d.width, d.height],
            "train_seconds": round(sum(state.seconds.values()), 2),
            "stage_seconds": stage_seconds,
            "trained_here": train,
            "generate_seconds": round(generate_seconds, 2),
            "sampling": {"steps": steps, "guidance": guidance, "seed": seed, "scheduler": scheduler},
            "autoencoder_psnr_heldout_db": state.metrics.get("autoencoder_psnr_heldout"),
            "final_losses": {k: v for k, v in state.metrics.items() if k.endswith("_loss")},
            "device": device,
            "run": str(run) if run_dir is not None else None,
        }
        del models, sampler
        return result


def _write_sheet(path: Path, generated: GeneratedSet, rows: int = 3) -> None:
    """Contact sheet: per trajectory, ground truth / CAA on / CAA off, one view per column."""
    import imageio.v3 as iio

    from ..demo import contact_sheet

    grid = []
    for k in range(min(rows, len(generated.truth))):
        grid += [list(generated.truth[k]), list(generated.caa[k]), list(generated.plain[k])]
    iio.imwrite(path, contact_sheet(grid, gap=2))


def load_config(path: str | None) -> TrainConfig:
    return TrainConfig.load(path or DEFAULT_CONFIG)


def summary(result: dict) -> str:
    return json.dumps(result)
