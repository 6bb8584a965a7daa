"""The scene-texturing job: a camera trajectory over meshes -> one baked texture for all of them.

Stages, each timed and reported through the :class:`JobContext`:

1. ``keyframe_selection``: overlap of every pair of frames, then keyframes along the trajectory.
2. ``keyframes``: all keyframes generated jointly (CAA ties the overlapping ones together).
3. ``interpolation``: every window between consecutive keyframes, conditioned on both ends.
4. ``bake``: the meshes' own UVs or an xatlas unwrap, then every generated frame blended in.
5. ``write``: texture, masks, frames, unwrapped UVs, consistency scores and the report.

The job stops at the next stage boundary or denoising step once ``ctx.cancel`` is set, and only
the last stage writes ``texture.png``, so a cancelled job never leaves one behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine import ModelSet
from ..eval.consistency import depth_overlap_psnr, overlap_psnr_ratio
from ..geometry.bake import BakeResult, View, bake
from ..geometry.correspondence import overlap_matrix
from ..geometry.keyframes import KeyframePlan, select_keyframes
from ..geometry.raster import rasterize_uv
from ..geometry.render import render_textured
from ..geometry.uv_atlas import Atlas, ensure_uvs
from ..protocol import TextureJob
from ..validation import InputError
from . import texturing_outputs as outputs
from .between_frames import fill_between
from .context import JobContext
from .interpolation import InterpolationPipeline
from .keyframes import KeyframePipeline
from .sampling import MultiViewSampler, SamplingSettings, StepInfo, preview

STAGES = ("keyframe_selection", "keyframes", "interpolation", "bake", "write")
MAX_IN_BETWEEN = 10  # in-between frames per interpolation batch at memory level 0
OVERLAP_STRIDE = 8  # pixel stride of the overlap estimate: keyframe choice needs no more detail


@dataclass
class Generated:
    """What the generation stages produced: every frame in trajectory order and the plan behind it."""

    frames: list[np.ndarray]
    plan: KeyframePlan
    isolated_views: list[int]  # frame indices of keyframes that overlapped no other keyframe


def run_texture_job(job: TextureJob, models: ModelSet, ctx: JobContext) -> dict[str, Any]:
    """Generate the trajectory's frames, bake them into one texture and write everything to ``ctx.out_dir``.

    Returns the report that is also written as ``report.json``. Raises ``InputError`` for a bad
    job (before any model runs) and ``Cancelled`` when ``ctx.cancel`` is set.
    """
    job.validate()  # a job built in code gets the checks a job read from the wire had
    mode = models.resolve_mode("depth", job.settings.mode)
    sampler = models.sampler("depth")
    sampler.check_views(job.cameras)  # sizes the UNet's levels can halve down to its innermost
    # Each memory level trades speed for memory: guidance halves in separate UNet calls, and
    # interpolation batches half as long (fewer views attend to each other at once). The sampler
    # is shared between jobs, so its memory setting is put back afterwards.
    split, sampler.split_guidance = sampler.split_guidance, ctx.memory_level >= 1
    try:
        return _run(job, sampler, ctx, {**models.describe("depth"), "mode": mode})
    finally:
        sampler.split_guidance = split


def _run(job: TextureJob, sampler: MultiViewSampler, ctx: JobContext, described: dict[str, str]) -> dict[str, Any]:
    max_in_between = max(1, MAX_IN_BETWEEN >> ctx.memory_level)
    settings = SamplingSettings.of(job.settings)
    prompts = _prompts(job)

    mode = described["mode"]
    with ctx.stage("keyframe_selection"):
        plan, overlap = _plan(job)
        atlas = _atlas(job) if mode == "training_free" else None  # the canvas views synchronise on
    generated = _generate(job, sampler, ctx, plan, overlap, prompts, settings, max_in_between, mode, atlas)

    with ctx.stage("bake"):
        atlas, result, coverage = _bake(job, generated.frames, atlas)

    with ctx.stage("write"):
        consistency = _consistency(generated.frames, job, atlas, result)
        ctx.check_cancel()
        _write_outputs(job, ctx, generated.frames, atlas, result)
    report = {**_report(job, ctx, generated, atlas.unwrapped, coverage, consistency), **described}
    outputs.write_json(ctx.out_dir / "report.json", report)
    return report


def _prompts(job: TextureJob) -> list[str]:
    prompts = [job.settings.prompts] if isinstance(job.settings.prompts, str) else list(job.settings.prompts)
    return prompts * len(job.cameras) if len(prompts) == 1 else prompts


def _plan(job: TextureJob) -> tuple[KeyframePlan, np.ndarray]:
    """Keyframes and windows from the overlap of all frames (a single frame is its own keyframe)."""
    if len(job.cameras) == 1:
        overlap = np.ones((1, 1))
    else:
        overlap = overlap_matrix(job.cameras, job.depths, stride=OVERLAP_STRIDE)
    return select_keyframes(overlap), overlap


def _generate(
    job: TextureJob,
    sampler: MultiViewSampler,
    ctx: JobContext,
    plan: KeyframePlan,
    overlap: np.ndarray,
    prompts: list[str],
    settings: SamplingSettings,
    max_in_between: int,
    mode: str = "trained",
    atlas: Atlas | None = None,
) -> Generated:
    """The ``keyframes`` and ``interpolation`` stages: every frame of the trajectory, in order.

    ``mode`` ``training_free`` synchronises views on ``atlas`` and fills the frames between
    keyframes from the keyframes' canvas instead of the interpolation module; ``independent``
    generates every frame alone.
    """
    keys = plan.keyframes
    keyframe_pipeline = KeyframePipeline(sampler, mode=mode)
    mesh = atlas.mesh if atlas is not None else None
    with ctx.stage("keyframes", settings.steps):
        def keyframe_progress(info: StepInfo) -> None:
            ctx.progress("keyframes", info.step, info.total)
            if ctx.wants_preview(info.step, info.total):
                ctx.preview(preview(sampler, info, views=[0])[0])

        result = keyframe_pipeline(
            [prompts[k] for k in keys], [job.cameras[k] for k in keys], [job.depths[k] for k in keys], settings,
            overlap=overlap[np.ix_(keys, keys)], progress=keyframe_progress, cancel=ctx.cancel, mesh=mesh,
        )
    frames: dict[int, np.ndarray] = dict(zip(keys, result.images, strict=True))

    batches = sum(math.ceil(len(between) / max_in_between) for _, _, between in plan.windows)
    with ctx.stage("interpolation", batches * settings.steps):
        def window_progress(number: int, windows: int, info: StepInfo) -> None:
            ctx.progress("interpolation", number * info.total + info.step, windows * info.total)
            if ctx.wants_preview(info.step, info.total):
                ctx.preview(preview(sampler, info, views=[1])[0])  # the batch's first in-between frame

        if batches and mode != "trained":
            frames.update(fill_between(keyframe_pipeline, plan, result.latents, prompts, job.cameras, job.depths,
                                       mesh, settings, max_in_between, progress=window_progress, cancel=ctx.cancel))
        elif batches:
            interpolation = InterpolationPipeline(keyframe_pipeline, max_in_between)
            frames.update(interpolation(plan, frames, prompts, job.cameras, job.depths, settings,
                                        progress=window_progress, cancel=ctx.cancel).images)
    isolated = [keys[v] for v in result.isolated_views]
    return Generated([frames[k] for k in range(len(job.cameras))], plan, isolated)


def unwrap_padding(texture_size: int) -> int:
    """Texels between the charts of an unwrap: 4 at 1024 (mipmaps stay clean a few levels down).

    A fixed gutter would eat a small texture: the demo room's charts no longer fit a 64 texel
    atlas with 4 texels between them, so the gutter scales with the size, 2 to 8 texels.
    """
    return min(8, max(2, texture_size // 256))


def _atlas(job: TextureJob) -> Atlas:
    """The mesh's own UVs, or an unwrap with the widest gutter (down to 1 texel) that still fits."""
    padding = unwrap_padding(job.texture_size)
    while True:
        try:
            return ensure_uvs(job.mesh, job.texture_size, padding)
        except InputError as err:
            if err.field != "resolution":
                raise
            if padding == 1:
                raise InputError("texture_size", f"{job.texture_size} texels cannot hold the charts of these "
                                 "meshes; ask for a larger texture") from None
            padding //= 2


def _bake(job: TextureJob, frames: list[np.ndarray], atlas: Atlas | None = None) -> tuple[Atlas, BakeResult, float]:
    """The atlas (made here unless given), the bake of every frame into it, and the share of covered
    texels some frame saw."""
    atlas = atlas if atlas is not None else _atlas(job)
    surface = rasterize_uv(atlas.mesh, job.texture_size)
    views = [View(frame, camera, depth) for frame, camera, depth in zip(frames, job.cameras, job.depths, strict=True)]
    result = bake(surface, views, object_ids=atlas.mesh.object_ids)
    covered = np.count_nonzero(surface.covered)
    return atlas, result, float(np.count_nonzero(result.seen & surface.covered) / covered) if covered else 0.0


def _consistency(frames: list[np.ndarray], job: TextureJob, atlas: Atlas, result: BakeResult) -> dict[str, Any]:
    """Overlap PSNR of the generated frames, alone and relative to a perfectly consistent texture.

    Raw overlap PSNR depends on the scene and the poses (resampling, texture detail), so MVDiffusion
    divides it by the PSNR of ground-truth views at the same poses. A texturing job has no ground
    truth; the closest stand-in is the baked texture itself rendered at the same poses: one texture,
    hence consistent by construction, showing what these poses and this protocol score at best.
    The ratio (``ratio_of_means``, the quotient of the two mean PSNRs, as the paper's panorama
    table) then says how much of that consistency the generated frames reach. Numbers that cannot
    be computed (a single frame, no overlapping pair) or are not finite come back as None.
    """
    empty = {"overlap_psnr_db": None, "overlap_psnr_ratio": None}
    if len(frames) < 2:
        return empty
    generated = depth_overlap_psnr(frames, job.cameras, job.depths)
    if math.isnan(generated.mean_psnr):
        return empty
    texture = result.texture_uint8()
    reference = depth_overlap_psnr([render_textured(atlas.mesh, texture, camera).image for camera in job.cameras],
                                   job.cameras, job.depths)
    try:
        ratio = overlap_psnr_ratio(generated, reference)["ratio_of_means"]
    except InputError:  # the reference scored no pair the generated frames did
        ratio = None
    return {"overlap_psnr_db": _finite(generated.mean_psnr, 3), "overlap_psnr_ratio": _finite(ratio, 4)}


def _write_outputs(job: TextureJob, ctx: JobContext, frames: list[np.ndarray], atlas: Atlas,
                   result: BakeResult) -> None:
    """Frames, masks and UVs first, the texture last: its presence means the outputs are complete."""
    out = ctx.out_dir
    outputs.write_frames(out / "frames", frames)
    outputs.write_mask(out / "seen_mask.png", result.seen)
    outputs.write_mask(out / "filled_mask.png", result.filled)
    if atlas.unwrapped:  # the add-on needs the new UVs; meshes that came with UVs keep their own
        outputs.write_npz(out / "uvs.npz", outputs.object_uvs(atlas.mesh, job.object_names))
    outputs.write_texture(out / "texture.png", result.texture, job.texture_bits)


def _report(job: TextureJob, ctx: JobContext, generated: Generated, unwrapped: bool, coverage: float,
            consistency: dict[str, Any]) -> dict[str, Any]:
    plan = generated.plan
    return {
        "kind": "texture",
        "frames": len(generated.frames),
        "keyframes": [int(k) for k in plan.keyframes],
        "windows": len(plan.windows),
        "weak_links": [[int(a), int(b)] for a, b in plan.weak_links],
        "isolated_views": generated.isolated_views,
        "texture_size": int(job.texture_size),
        "texture_bits": int(job.texture_bits),
        "unwrapped": bool(unwrapped),
        "memory_level": int(ctx.memory_level),
        "scheduler": job.settings.scheduler,
        "steps": int(job.settings.steps),
        "guidance_scale": float(job.settings.guidance_scale),
        "seed": int(job.settings.seed),
        "coverage": round(coverage, 5),
        "seconds": {stage: round(seconds, 3) for stage, seconds in ctx.seconds.items()},
        **consistency,
    }


def _finite(value: float | None, digits: int) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(value) else None
