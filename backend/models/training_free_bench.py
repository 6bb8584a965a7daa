"""Cost of the training-free mode per denoising step (``bench unet --mode training_free``).

The step is the one a pipeline runs: all views and both guidance halves in one UNet call. Two
costs are measured against the plain step (the UNet with its own attention, every view alone):

* attention across views: every self-attention layer also reads the tokens at each query's
  depth correspondences in its neighbour views (the cell itself, the default, and 3 x 3 around
  it), timed interleaved with the plain step;
* canvas synchronisation: the clean estimate of every view blended on the scene's UV atlas at
  latent resolution and mapped back, plus the model output rewritten to match; its per-job set-up
  (rasterising the atlas and the views) is reported apart.

Views lie along the demo room's loop, each with its best-overlapping neighbours, as in
:mod:`~backend.models.benchmark`'s depth task.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..geometry.canvas import canvas_size, latent_depth, mesh_canvas
from ..geometry.uv_atlas import ensure_uvs
from ..scenes.demo_room import build_demo_room
from .benchmark import TASK_IMAGE_SIZE, sd2_structured_unet, trajectory_neighbours
from .mv_unet import MultiViewUNet
from .schedulers import build_scheduler, clean_estimate, model_output_from_clean
from .tiny import SD2_SCHEDULER
from .view_attention_geometry import depth_view_attention, on_device, unet_level_strides

LATENT_FACTOR = 8


def run_training_free_benchmark(
    views: int = 8,
    channels: tuple[int, ...] = (64, 128, 256, 256),
    neighbours: int = 4,
    repeats: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: tuple[int, int] | None = None,
    kernels: tuple[int, ...] = (1, 3),
) -> dict:
    """Step costs for each K x K neighbourhood in ``kernels`` (the first is the default's row)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    width, height = image_size or TASK_IMAGE_SIZE["depth"]
    unet = sd2_structured_unet(channels, 5).to(dev)
    model = MultiViewUNet(unet, "depth").to(dev, dtype)
    cameras, depths, graph = trajectory_neighbours(views, neighbours, width, height)
    start = time.perf_counter()
    strides = unet_level_strides(unet, width, height, LATENT_FACTOR)
    attentions = [on_device(depth_view_attention(cameras, depths, graph, strides, k), dev, dtype) for k in kernels]
    attention_setup = (time.perf_counter() - start) / len(kernels)
    latent = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    sample = torch.randn(2 * views, 5, *latent, device=dev, dtype=dtype)
    text = torch.randn(2 * views, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)

    def call(attention) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        model(sample, 500, text, attention=attention)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    with torch.no_grad():
        for attention in (None, *attentions):
            call(attention)
        rounds = [[call(attention) for attention in (None, *attentions)] for _ in range(repeats)]
    plain = statistics.median(r[0] for r in rounds)
    per_kernel = {
        f"{k}x{k}": {"overhead": round(statistics.median(r[i + 1] / r[0] for r in rounds), 4),
                     "step_seconds": round(statistics.median(r[i + 1] for r in rounds), 4),
                     "key_tokens_attended": int(next(iter(attentions[i].tokens.values())).count)}
        for i, k in enumerate(kernels)
    }
    first = per_kernel[f"{kernels[0]}x{kernels[0]}"]

    start = time.perf_counter()
    mesh = ensure_uvs(build_demo_room().mesh, 1024, 4).mesh
    latent_cameras = [c.scaled(1 / LATENT_FACTOR) for c in cameras]
    latent_depths = [latent_depth(d, LATENT_FACTOR) for d in depths]
    size = canvas_size(latent_cameras, latent_depths, mesh)
    canvas = mesh_canvas(mesh, latent_cameras, latent_depths, size).to(dev)
    sync_setup = time.perf_counter() - start
    scheduler = build_scheduler("ddim", SD2_SCHEDULER)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]
    x = torch.randn(views, 4, *latent, device=dev, dtype=dtype)
    noise = torch.randn_like(x)

    def sync() -> float:
        begin = time.perf_counter()
        clean = canvas.synchronise(clean_estimate(scheduler, noise, t, x))
        model_output_from_clean(scheduler, clean, t, x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    sync()
    sync_seconds = statistics.median(sync() for _ in range(max(5, repeats)))
    return {
        "benchmark": "unet",
        "mode": "training_free",
        "attention_overhead": first["overhead"],
        "step_seconds_plain": round(plain, 4),
        "step_seconds_attention": first["step_seconds"],
        "kernels": per_kernel,
        "sync_seconds": round(sync_seconds, 5),
        "sync_fraction_of_plain_step": round(sync_seconds / plain, 5),
        "attention_setup_seconds": round(attention_setup, 3),
        "sync_setup_seconds": round(sync_setup, 3),
        "canvas_texels": int(canvas.cells),
        "canvas_size": int(size),
        "views": views,
        "batch": 2 * views,
        "neighbours": max(len(row) for row in graph),
        "config": {"channels": list(channels), "latent": list(latent), "cfg": True,
                   "dtype": str(dtype).replace("torch.", ""), "device": device},
    }
