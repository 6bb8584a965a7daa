"""The scene-texturing job: a camera trajectory over meshes -> one baked texture for all of them.

Stages, each timed and reported through the :class:`JobContext`:

1. ``unwrap``: the meshes' own UVs or an xatlas unwrap (in a child process). It comes first so
   that a mesh xatlas cannot unwrap fails the job before any GPU work.
2. ``visibility``: what each camera sees of the atlas, from the depth maps alone; a job whose
   cameras see nothing (inside an object, back faces only) fails here, before any GPU work.
3. ``keyframe_selection``: overlap of every pair of frames, then keyframes along the trajectory.
4. ``keyframes``: all keyframes generated jointly (CAA ties the overlapping ones together).
5. ``interpolation``: every window between consecutive keyframes, conditioned on both ends.
6. ``bake``: every generated frame blended into the atlas.
7. ``write``: texture, masks, frames, unwrapped UVs, consistency scores and the report.

Every stage checks ``ctx.cancel`` inside its loops (per pair of views, per view, per denoising
step, per frame written) and stops there; only the last stage writes ``texture.png``, so a
cancelled job never leaves one behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..atomic import json_number
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
from .texturing_checks import check_visibility
from .training_free import job_mode

STAGES = ("unwrap", "visibility", "keyframe_selection", "keyframes", "interpolation", "bake", "write")
MAX_IN_BETWEEN = 10  # in-between frames per interpolation batch at memory level 0
OVERLAP_STRIDE = 8  # pixel stride of the overlap estimate: keyframe choice needs no more detail
REFERENCE_PAIRS = 8
"""Consecutive frame pairs, evenly spread, whose views the consistency reference renders (two
renders each on the CPU); the generated frames' own overlap PSNR scores every pair."""


@dataclass
class Generated:
    """What the generation stages produced: every frame in trajectory order and the plan behind it."""

    frames: list[np.ndarray]
    plan: KeyframePlan
    isolated_views: list[int]  # frame indices of keyframes that overlapped no other keyframe


def run_texture_job(job: TextureJob, sampler: MultiViewSampler, ctx: JobContext,
                    described: dict[str, str] | None = None, mode: str | None = None) -> dict[str, Any]:
    """Generate the trajectory's frames, bake them into one texture and write everything to ``ctx.out_dir``.

    ``sampler``: the depth task's; ``described``: what it is made of (``ModelSet.describe``), for
    the report; ``mode``: how views are tied together (``ModelSet.resolve_mode``; default: the
    job's, else :func:`~backend.pipelines.training_free.job_mode`'s). Returns the report that is
    also written as ``report.json``. Raises ``InputError``
    for a bad job (before any model runs) and ``Cancelled`` when ``ctx.cancel`` is set.
    """
    job.validate()  # a job built in code gets the checks a job read from the wire had
    sampler.check_views(job.cameras)  # sizes the UNet's levels can halve down to its innermost
    mode = job_mode(mode or job.settings.mode, sampler)
    return _run(job, sampler, ctx, {**(described or {}), "mode": mode})


def _run(job: TextureJob, sampler: MultiViewSampler, ctx: JobContext, described: dict[str, str]) -> dict[str, Any]:
    # Each memory level trades speed for memory: guidance halves in separate UNet calls, and
    # interpolation batches half as long (fewer views attend to each other at once).
    max_in_between = max(1, MAX_IN_BETWEEN >> ctx.memory_level)
    settings = SamplingSettings.of(job.settings, split_guidance=ctx.memory_level >= 1)
    prompts = _prompts(job)

    mode = described["mode"]
    with ctx.stage("unwrap"):
        atlas = _atlas(job, ctx)  # also the canvas the training-free mode synchronises views on
    with ctx.stage("visibility", len(job.cameras)):
        visibility = check_visibility(job, atlas, ctx.check_cancel,
                                      lambda step, total: ctx.progress("visibility", step, total))
    with ctx.stage("keyframe_selection", len(job.cameras)):
        plan, overlap = _plan(job, ctx)
    generated = _generate(job, sampler, ctx, plan, overlap, prompts, settings, max_in_between, mode, atlas)

    with ctx.stage("bake", len(job.cameras)):
        result, coverage = _bake(job, atlas, generated.frames, ctx)

    with ctx.stage("write", 1 + len(job.cameras)):
        consistency = _consistency(generated.frames, job, atlas, result, ctx)
        ctx.check_cancel()
        _write_outputs(job, ctx, generated.frames, atlas, result)
        ctx.progress("write", 1 + len(job.cameras), 1 + len(job.cameras))
    report = {**_report(job, ctx, generated, atlas.unwrapped, coverage, consistency), **described,
              "empty_depth": [round(share, 4) for share in visibility.empty_depth],
              "blind_cameras": visibility.blind_cameras, "warnings": visibility.warnings(coverage)}
    outputs.write_json(ctx.out_dir / "report.json", report)
    return report


def _prompts(job: TextureJob) -> list[str]:
    prompts = [job.settings.prompts] if isinstance(job.settings.prompts, str) else list(job.settings.prompts)
    return prompts * len(job.cameras) if len(prompts) == 1 else prompts


def _plan(job: TextureJob, ctx: JobContext) -> tuple[KeyframePlan, np.ndarray]:
    """Keyframes and windows from the overlap of all frames (a single frame is its own keyframe)."""
    if len(job.cameras) == 1:
        overlap = np.ones((1, 1))
    else:
        overlap = overlap_matrix(job.cameras, job.depths, stride=OVERLAP_STRIDE, check=ctx.check_cancel,
                                 progress=lambda step, total: ctx.progress("keyframe_selection", step, total))
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
        elif batches and sampler.model.condition is not None:
            interpolation = InterpolationPipeline(keyframe_pipeline, max_in_between)
            frames.update(interpolation(plan, frames, prompts, job.cameras, job.depths, settings,
                                        progress=window_progress, cancel=ctx.cancel).images)
        elif batches:
            frames.update(_in_between_alone(job, keyframe_pipeline, plan, prompts, settings, max_in_between, ctx))
    isolated = [keys[v] for v in result.isolated_views]
    return Generated([frames[k] for k in range(len(job.cameras))], plan, isolated)


def _in_between_alone(job: TextureJob, pipeline: KeyframePipeline, plan: KeyframePlan, prompts: list[str],
                      settings: SamplingSettings, max_in_between: int, ctx: JobContext) -> dict[int, np.ndarray]:
    """In-between frames from their own prompt and depth, for a base without the trained interpolation module."""
    batches = [frames[start : start + max_in_between] for _, _, frames in plan.windows
               for start in range(0, len(frames), max_in_between)]
    images: dict[int, np.ndarray] = {}
    for number, batch in enumerate(batches):
        def report(info: StepInfo, number: int = number) -> None:
            ctx.progress("interpolation", number * info.total + info.step, len(batches) * info.total)
            if ctx.wants_preview(info.step, info.total):
                ctx.preview(preview(pipeline.sampler, info, views=[0])[0])

        result = pipeline([prompts[k] for k in batch], [job.cameras[k] for k in batch],
                          [job.depths[k] for k in batch], settings, progress=report, cancel=ctx.cancel)
        images.update(zip(batch, result.images, strict=True))
    return images


def unwrap_padding(texture_size: int) -> int:
    """Texels between the charts of an unwrap: 4 at 1024 (mipmaps stay clean a few levels down).

    A fixed gutter would eat a small texture: the demo room's charts no longer fit a 64 texel
    atlas with 4 texels between them, so the gutter scales with the size, 2 to 8 texels.
    """
    return min(8, max(2, texture_size // 256))


def _atlas(job: TextureJob, ctx: JobContext) -> Atlas:
    """The mesh's own UVs, or an unwrap with the widest gutter (down to 1 texel) that still fits."""
    padding = unwrap_padding(job.texture_size)
    while True:
        try:
            return ensure_uvs(job.mesh, job.texture_size, padding, check=ctx.check_cancel,
                              progress=lambda step, total: ctx.progress("unwrap", step, total))
        except InputError as err:
            if err.field != "resolution":
                raise
            if padding == 1:
                raise InputError("texture_size", f"{job.texture_size} texels cannot hold the charts of these "
                                 "meshes; ask for a larger texture") from None
            padding //= 2


def _bake(job: TextureJob, atlas: Atlas, frames: list[np.ndarray], ctx: JobContext) -> tuple[BakeResult, float]:
    """The bake of every frame into the atlas, and the share of covered texels some frame saw."""
    surface = rasterize_uv(atlas.mesh, job.texture_size, check=ctx.check_cancel)
    views = [View(frame, camera, depth) for frame, camera, depth in zip(frames, job.cameras, job.depths, strict=True)]
    result = bake(surface, views, object_ids=atlas.mesh.object_ids, check=ctx.check_cancel,
                  progress=lambda step, total: ctx.progress("bake", step, total))
    covered = np.count_nonzero(surface.covered)
    return result, float(np.count_nonzero(result.seen & surface.covered) / covered) if covered else 0.0


def _consistency(frames: list[np.ndarray], job: TextureJob, atlas: Atlas, result: BakeResult,
                 ctx: JobContext) -> dict[str, Any]:
    """Overlap PSNR of the generated frames, alone and relative to a perfectly consistent texture.

    Raw overlap PSNR depends on the scene and the poses (resampling, texture detail), so MVDiffusion
    divides it by the PSNR of ground-truth views at the same poses. A texturing job has no ground
    truth; the closest stand-in is the baked texture itself rendered at the same poses: one texture,
    hence consistent by construction, showing what these poses and this protocol score at best.
    The ratio (``ratio_of_means``, the quotient of the two mean PSNRs, as the paper's panorama
    table) then says how much of that consistency the generated frames reach. Rendering costs
    about a second per 512 x 512 view, so the ratio is taken over at most :data:`REFERENCE_PAIRS`
    consecutive pairs spread evenly along the trajectory; ``overlap_psnr_ratio_pairs`` says how
    many of the ``overlap_pairs`` it used. Numbers that cannot be computed (a single frame, no
    overlapping pair) or are not finite come back as None.
    """
    pairs = [(i, i + 1) for i in range(len(frames) - 1)]
    empty = {"overlap_psnr_db": None, "overlap_psnr_ratio": None, "overlap_pairs": len(pairs),
             "overlap_psnr_ratio_pairs": 0}
    if not pairs:
        return empty
    generated = depth_overlap_psnr(frames, job.cameras, job.depths)
    if math.isnan(generated.mean_psnr):
        return empty
    chosen = [pairs[k] for k in sorted({round(x) for x in np.linspace(0, len(pairs) - 1, REFERENCE_PAIRS)})]
    views = sorted({index for pair in chosen for index in pair})
    local = {view: k for k, view in enumerate(views)}
    local_pairs = [(local[i], local[j]) for i, j in chosen]
    cameras, depths = [job.cameras[v] for v in views], [job.depths[v] for v in views]
    texture = result.texture_uint8()
    renders = []
    for number, camera in enumerate(cameras, start=1):
        ctx.check_cancel()
        renders.append(render_textured(atlas.mesh, texture, camera).image)
        ctx.progress("write", number, 1 + len(cameras))
    reference = depth_overlap_psnr(renders, cameras, depths, local_pairs)
    sampled = depth_overlap_psnr([frames[v] for v in views], cameras, depths, local_pairs)
    try:
        ratio = overlap_psnr_ratio(sampled, reference)["ratio_of_means"]
    except InputError:  # the reference scored no pair the generated frames did
        ratio = None
    return {"overlap_psnr_db": json_number(generated.mean_psnr, 3), "overlap_psnr_ratio": json_number(ratio, 4),
            "overlap_pairs": len(pairs), "overlap_psnr_ratio_pairs": len(chosen)}


def _write_outputs(job: TextureJob, ctx: JobContext, frames: list[np.ndarray], atlas: Atlas,
                   result: BakeResult) -> None:
    """Frames, masks and UVs first, the texture last: its presence means the outputs are complete."""
    out = ctx.out_dir
    outputs.write_frames(out / "frames", frames, check=ctx.check_cancel)
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
