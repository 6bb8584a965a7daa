"""The panorama job: text -> views around one centre -> stitched equirect -> HDR World texture.

Stages, each timed into ``ctx.seconds`` and reported through ``ctx.progress``:

* ``views``: the ring and both pole views generated jointly (around the job's image, which stays
  the front view, when it has one: the inpainting model outpaints it) (one progress report per denoising
  step, a decoded preview of view 0 when the context asks for one, cancel within one step);
* ``stitch``: the views blended into a 2:1 equirect in Cycles' convention, poles included;
* ``hdr``: inverse tone mapping of the display-referred equirect to linear radiance;
* ``write``: ``panorama.exr`` and ``panorama.hdr`` (the same radiance, for whichever the user's
  tools prefer), ``panorama_preview.png`` (the radiance tone mapped back), ``panorama_ldr.png``
  (what the model painted), ``views/view_NN.png``; then ``report.json``, written last so that it
  holds the write stage's time and a reader never sees a report without the files it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image

from ..atomic import json_number, write_atomically, write_json
from ..geometry.cameras import Camera
from ..geometry.equirect import stitch_equirect
from ..geometry.panorama import panorama_layout
from ..imaging.hdr import DEFAULT_KNEE, DEFAULT_PEAK, inverse_tone_map, tone_map_preview, write_exr, write_hdr
from ..protocol import PANORAMA_RING_VIEWS, PANORAMA_VIEW_ORDER, PanoramaJob, check_prompt_count
from ..validation import InputError
from .context import JobContext
from .outpaint import PanoramaOutpaintPipeline
from .panorama import PanoramaPipeline
from .sampling import MultiViewSampler, SamplingSettings, StepInfo, preview, to_uint8
from .training_free import job_mode

RING_VIEWS = PANORAMA_RING_VIEWS
FILES = ("panorama.exr", "panorama.hdr", "panorama_preview.png", "panorama_ldr.png")


@dataclass
class Panorama:
    """Everything a panorama job computes before it writes anything."""

    views: np.ndarray  # float (V, S, S, 3) in [0, 1], display-referred
    cameras: list[Camera]
    ldr: np.ndarray  # float32 (H, 2H, 3) in [0, 1], the stitched views
    coverage: float  # share of equirect pixels some view sees (1 for the default layout)
    radiance: np.ndarray  # float32 (H, 2H, 3), linear


def run_panorama_job(job: PanoramaJob, sampler: MultiViewSampler, ctx: JobContext,
                     described: dict[str, str] | None = None, mode: str | None = None) -> dict[str, Any]:
    """Run a panorama job into ``ctx.out_dir`` and return its report (also ``report.json``).

    ``sampler``: the panorama task's; ``described``: what it is made of (``ModelSet.describe``);
    ``mode``: how views are tied together (``ModelSet.resolve_mode``; default: the job's, else
    :func:`~backend.pipelines.training_free.job_mode`'s).
    """
    mode = job_mode(mode or job.settings.mode, sampler)
    panorama = make_panorama(job, sampler, ctx, mode)
    with ctx.stage("write"):
        write_outputs(ctx.out_dir, panorama)
    report = {**panorama_report(job, panorama, ctx.seconds), **(described or {}), "mode": mode}
    write_json(ctx.out_dir / "report.json", report)
    return report


def make_panorama(job: PanoramaJob, sampler: MultiViewSampler, ctx: JobContext, mode: str = "trained") -> Panorama:
    """The views, stitched equirect and radiance of a job (stages views, stitch and hdr), their
    views tied together as ``mode`` says (:data:`~backend.protocol.MODES`; a panorama from an
    image keeps its front view and ties the others through the trained outpainting blocks)."""
    job.validate()  # a job built in code gets the checks a job read from the wire had
    settings, height = job.settings, job.equirect_height
    view_size = sampler.native_size if job.view_size is None else job.view_size
    factor = sampler.view_multiple
    if view_size % factor:
        raise InputError("view_size", f"must be a multiple of {factor}, got {view_size}")
    cameras = panorama_layout(view_size, ring_views=RING_VIEWS, pole_views=True)
    prompts = layout_prompts(settings.prompts, len(cameras))
    # Guidance halves in separate UNet calls after an out-of-memory retry: the same views, less memory.
    sampling = SamplingSettings.of(settings, split_guidance=ctx.memory_level >= 1)

    def on_step(info: StepInfo) -> None:
        ctx.progress("views", info.step, info.total)
        if ctx.wants_preview(info.step, info.total):
            ctx.preview(preview(sampler, info, views=[0])[0])

    with ctx.stage("views", settings.steps):
        if job.image is None:
            views = PanoramaPipeline(sampler, mode)(
                prompts, cameras, sampling, progress=on_step, cancel=ctx.cancel, output_float=True
            ).images
        else:
            front = front_view(job.image, view_size)
            views = PanoramaOutpaintPipeline(sampler)(
                front, prompts, cameras, sampling, progress=on_step, cancel=ctx.cancel, output_float=True
            ).images.copy()
            views[0] = front / 255.0  # the given image is the front view as it was, not as re-encoded
    with ctx.stage("stitch"):
        ldr, weight = stitch_equirect(list(views), cameras, height=height)
        ldr = np.clip(ldr, 0.0, 1.0)  # a weighted mean of [0, 1] views, up to rounding
    with ctx.stage("hdr"):
        radiance = inverse_tone_map(ldr)
    return Panorama(views, cameras, ldr, float(np.mean(weight > 0)), radiance)


def front_view(image: np.ndarray, size: int) -> np.ndarray:
    """The front view made from a job's image: its centre square scaled to ``size`` (uint8, Lanczos)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    if side == size:
        return square
    return np.array(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))


def layout_prompts(prompts: list[str], views: int) -> str | list[str]:
    """One prompt for every view, or one per view in layout order (ring from +X turning right, top, bottom)."""
    check_prompt_count(len(prompts), views, PANORAMA_VIEW_ORDER)
    return prompts[0] if len(prompts) == 1 else list(prompts)


def write_outputs(out_dir: Path, panorama: Panorama) -> None:
    """The radiance as EXR and HDR, the two 8-bit panoramas, and every view as a PNG."""
    write_atomically(out_dir / "panorama.exr", lambda path: write_exr(path, panorama.radiance))
    write_atomically(out_dir / "panorama.hdr", lambda path: write_hdr(path, panorama.radiance))
    write_png(out_dir / "panorama_preview.png", tone_map_preview(panorama.radiance))
    write_png(out_dir / "panorama_ldr.png", to_uint8(panorama.ldr))
    views_dir = out_dir / "views"
    views_dir.mkdir(exist_ok=True)
    for index, view in enumerate(to_uint8(panorama.views)):
        write_png(views_dir / f"view_{index:02d}.png", view)


def write_png(path: Path, pixels: np.ndarray) -> None:
    write_atomically(path, lambda partial: iio.imwrite(partial, pixels, extension=".png"))


def panorama_report(job: PanoramaJob, panorama: Panorama, seconds: dict[str, float]) -> dict[str, Any]:
    """What a user (and the Blender add-on) needs to know about a finished panorama job.

    The mean radiance weights each equirect row by its solid angle (the cosine of its latitude),
    so it is the mean over directions of the sphere, not over the poles' stretched rows.
    """
    height, width = panorama.radiance.shape[:2]
    latitude = np.pi * (0.5 - (np.arange(height) + 0.5) / height)
    row_weight = np.cos(latitude) / np.cos(latitude).sum()
    mean = float(np.einsum("h,hwc->", row_weight, panorama.radiance, dtype=np.float64) / (width * 3))
    settings = job.settings
    return {
        "kind": job.kind,
        "from_image": job.image is not None,
        "equirect": {"width": width, "height": height},
        "views": len(panorama.cameras),
        "view_size": panorama.cameras[0].width,
        "coverage": panorama.coverage,
        "seconds": {name: round(value, 4) for name, value in seconds.items()},
        "max_radiance": json_number(panorama.radiance.max()),
        "mean_radiance": json_number(mean),
        "tone_mapping": {
            "curve": "identity below knee, inverse extended Reinhard above",
            "peak": DEFAULT_PEAK,
            "knee": DEFAULT_KNEE,
        },
        "seed": settings.seed,
        "scheduler": settings.scheduler,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "prompts": list(settings.prompts),
        "negative_prompt": settings.negative_prompt,
        "files": [*FILES, *(f"views/view_{k:02d}.png" for k in range(len(panorama.views)))],
    }
