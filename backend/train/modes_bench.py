"""The generation modes side by side on the consistency benchmark's held-out data and tiny trained base.

For each held-out trajectory the keyframe pipeline (the code path of real jobs) generates the views
four ways from the same seed: ``independent`` (every view alone), ``caa`` (the trained blocks),
``attention`` (training-free attention across views only) and ``sync`` (that attention plus canvas
synchronisation on the scene's UV atlas). Each is scored by overlap PSNR over the ground truth's
(the ratio), by the high-frequency energy of its views over the independent views' (``detail``:
agreement bought with blur shows here) and by the prompt-colour error (each visible object's mean
colour against the ground-truth render's).

The panorama row generates a training-free 8 + 2 view panorama with the same base and compares it
with independent views: ring overlap PSNR over the ground truth's (held-out synthetic landscapes
at the same poses), the stitched equirect's wrap seam, and detail. The base is a depth model; its
panorama views get a constant depth channel (every pixel equally far), the closest it has to an
unconditioned view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..eval.view_quality import high_frequency_energy, object_colour_error

ROWS = ("independent", "caa", "attention", "sync")


@dataclass
class ModeImages:
    """Per row, the generated views (uint8 (V, H, W, 3)) of every trajectory."""

    images: dict[str, list[np.ndarray]] = field(default_factory=lambda: {row: [] for row in ROWS})


def generate_rows(sampler, sample, mesh, settings, sync, rows: tuple[str, ...] = ROWS) -> dict[str, np.ndarray]:
    """The views of one held-out sample in the mode of each of ``rows``."""
    from ..pipelines.keyframes import KeyframePipeline

    cameras, depths = sample.cameras, list(sample.depths)
    pipelines = {
        "independent": (KeyframePipeline(sampler, mode="independent"), None),
        "caa": (KeyframePipeline(sampler, mode="trained"), None),
        "attention": (KeyframePipeline(sampler, mode="training_free", sync=sync), None),
        "sync": (KeyframePipeline(sampler, mode="training_free", sync=sync), mesh),
    }
    return {row: pipelines[row][0](sample.prompts, cameras, depths, settings, mesh=pipelines[row][1]).images
            for row in rows}


def row_results(truth_score, scores: dict, generated: ModeImages, truth: list[np.ndarray],
                object_ids: list[np.ndarray]) -> dict:
    """``ratio_<row>``, ``detail_ratio_<row>`` and ``colour_error_<row>`` for every row, and how they compare."""
    from ..eval.consistency import overlap_psnr_ratio

    out: dict = {}
    base_detail = np.mean([high_frequency_energy(v) for v in generated.images["independent"]])
    for row in ROWS:
        views = generated.images[row]
        out[f"ratio_{row}"] = round(overlap_psnr_ratio(scores[row], truth_score)["ratio_of_means"], 4)
        detail = np.mean([high_frequency_energy(v) for v in views])
        out[f"detail_ratio_{row}"] = round(float(detail / base_detail), 4)
        errors = [object_colour_error(v, t, ids) for v, t, ids in zip(views, truth, object_ids, strict=True)]
        out[f"colour_error_{row}"] = round(float(np.nanmean(errors)), 4)
    out["colour_error_sync_over_independent"] = round(out["colour_error_sync"] / out["colour_error_independent"], 4)
    out["sync_gain_over_independent"] = round(out["ratio_sync"] - out["ratio_independent"], 4)
    return out


def panorama_row(sampler, count: int, settings, sync, view_size: int = 64, seed: int = 0) -> dict:
    """Training-free 8 + 2 view panoramas against independent views on held-out synthetic landscapes."""
    import torch

    from ..eval.consistency import overlap_psnr_ratio
    from ..eval.panorama_metrics import panorama_overlap_psnr, seam_discontinuity
    from ..geometry.equirect import stitch_equirect
    from ..geometry.panorama import neighbour_views
    from ..models.depth_control import depth_channel
    from ..pipelines.sampling import to_uint8
    from ..pipelines.training_free import panorama_training_free
    from .consistency_bench import pooled_score
    from .synthetic_panorama import SyntheticPanoramaData

    data = SyntheticPanoramaData(count, view_size=view_size, seed=seed, split="heldout")
    factor = sampler.latent_factor
    cameras = data.cameras
    extras = panorama_training_free(sampler.model.unet, cameras, neighbour_views(cameras), factor, sync)
    flat = depth_channel(np.ones((view_size, view_size), np.float32), view_size // factor, view_size // factor)
    channel = flat[None].repeat(len(cameras), 1, 1, 1).to(sampler.device, sampler.dtype)
    scores: dict[str, list] = {"truth": [], "independent": [], "sync": []}
    seams: dict[str, list] = {"independent": [], "sync": []}
    detail: dict[str, list] = {"independent": [], "sync": []}
    for k in range(count):
        sample = data[k]
        run = settings.__class__(**{**settings.__dict__, "seed": settings.seed + k})
        scores["truth"].append(panorama_overlap_psnr(list(sample.images), cameras))
        for row, tools in (("independent", None), ("sync", extras)):
            images, _ = sampler.generate(sample.prompts, (view_size, view_size), run, None,
                                         control=channel, training_free=tools)
            views = to_uint8(images)
            scores[row].append(panorama_overlap_psnr(list(views), cameras))
            stitched, _ = stitch_equirect(list(views), cameras, height=2 * view_size)
            seams[row].append(seam_discontinuity(stitched).score)
            detail[row].append(high_frequency_energy(views))
    truth = pooled_score(scores["truth"])
    ratios = {row: overlap_psnr_ratio(pooled_score(scores[row]), truth)["ratio_of_means"]
              for row in ("independent", "sync")}
    del torch
    return {
        "panorama_ratio_independent": round(ratios["independent"], 4),
        "panorama_ratio_training_free": round(ratios["sync"], 4),
        "panorama_seam_independent": round(float(np.mean(seams["independent"])), 4),
        "panorama_seam_training_free": round(float(np.mean(seams["sync"])), 4),
        "panorama_detail_ratio_training_free": round(float(np.mean(detail["sync"]) / np.mean(detail["independent"])),
                                                     4),
        "panorama_views": len(cameras),
        "panorama_trajectories": count,
    }
