"""Multi-view consistency from a pretrained image model alone: what the denoising loop adds per step.

Three tools, each optional, none with weights of its own:

* attention across views (:mod:`~backend.models.view_attention`): the UNet's self-attention
  layers read the neighbour views' tokens inside every UNet call;
* canvas synchronisation (:mod:`~backend.geometry.canvas`): in a range of steps, every view's
  predicted clean latent is blended on the shared canvas and mapped back, and the step goes on
  from the fused estimate, its noise prediction rewritten to match (so any scheduler, DDIM or
  DPM-Solver, steps from a consistent pair of x_t and prediction);
* known content: latents a view must show where a mask says so (frames between keyframes, where
  the keyframes' canvas is seen), put in the same way, through the clean estimate, at every step:
  the next x_t is the known content re-noised to that step's level with the step's own noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.canvas import CanvasMap, canvas_size, equirect_canvas, latent_depth, mesh_canvas
from ..geometry.mesh import Mesh
from ..models.schedulers import clean_estimate, model_output_from_clean
from ..models.view_attention import ViewAttention
from ..models.view_attention_geometry import (
    depth_view_attention,
    nearest_neighbours,
    on_device,
    panorama_view_attention,
    unet_level_strides,
)
from ..sampling_options import DEFAULT_SYNC_SHARPNESS, DEFAULT_SYNC_START, DEFAULT_SYNC_STOP, MODES
from ..validation import InputError, in_range


def check_mode(field: str, mode: str) -> str:
    if mode not in MODES:
        raise InputError(field, f"must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def job_mode(requested: str | None, sampler) -> str:
    """The mode a job runs in: ``requested``, else ``trained`` where the base has trained multi-view
    blocks and ``training_free`` where it has none. A server resolves it with what it has loaded
    (:meth:`~backend.engine.ModelSet.resolve_mode`), which also refuses ``trained`` without weights."""
    if requested is not None:
        return check_mode("mode", requested)
    return "trained" if sampler.adapter.trained_multiview else "training_free"


@dataclass(frozen=True)
class SyncSettings:
    """Steps (as shares of the run, ``start`` <= share < ``stop``) in which the canvas synchronises,
    and ``sharpness``: the power the views' blend weights are raised to (higher: each canvas cell
    follows the view that sees it best, keeping its detail, instead of averaging views)."""

    start: float = DEFAULT_SYNC_START
    stop: float = DEFAULT_SYNC_STOP
    sharpness: float = DEFAULT_SYNC_SHARPNESS

    def __post_init__(self) -> None:
        in_range("sync_start", self.start, 0.0, 1.0)
        in_range("sync_stop", self.stop, 0.0, 1.0)
        in_range("sync_sharpness", self.sharpness, 0.0, 64.0)

    def active(self, index: int, total: int) -> bool:
        share = index / max(total, 1)
        return self.start <= share < self.stop


@dataclass
class KnownContent:
    """Latents (V, C, h, w) the views must show where ``mask`` (V, 1, h, w) in [0, 1] is set."""

    latents: torch.Tensor
    mask: torch.Tensor


@dataclass
class TrainingFree:
    """Per-run multi-view inputs of the training-free mode; every part may be absent."""

    attention: ViewAttention | None = None
    canvas: CanvasMap | None = None
    sync: SyncSettings = SyncSettings()
    known: KnownContent | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> TrainingFree:
        attention = on_device(self.attention, device, dtype) if self.attention is not None else None
        canvas = self.canvas.to(device) if self.canvas is not None else None
        known = None
        if self.known is not None:
            known = KnownContent(self.known.latents.to(device, dtype), self.known.mask.to(device, dtype))
        return TrainingFree(attention, canvas, self.sync, known)

    def adjust(self, scheduler, noise: torch.Tensor, t, scaled: torch.Tensor, index: int, total: int) -> torch.Tensor:
        """The model output the step goes on from: synchronised and with the known content put in."""
        sync = self.canvas is not None and self.sync.active(index, total)
        if not sync and self.known is None:
            return noise
        clean = clean_estimate(scheduler, noise, t, scaled)
        if sync:
            clean = self.canvas.synchronise(clean, self.sync.sharpness)
        if self.known is not None:
            mask = self.known.mask
            clean = clean * (1 - mask) + self.known.latents * mask
        return model_output_from_clean(scheduler, clean, t, scaled)


def depth_training_free(
    unet, cameras: Sequence[Camera], depths: Sequence[np.ndarray], overlap: np.ndarray | None, latent_factor: int,
    mesh: Mesh | None = None, sync: SyncSettings | None = None, known: KnownContent | None = None,
) -> TrainingFree:
    """Attention over the overlap graph and, with a UV-mapped ``mesh``, its atlas as the canvas."""
    cameras, depths = list(cameras), list(depths)
    width, height = cameras[0].width, cameras[0].height
    attention = None
    if len(cameras) > 1 and overlap is not None:
        neighbours = nearest_neighbours(overlap)
        if any(neighbours):
            strides = unet_level_strides(unet, width, height, latent_factor)
            attention = depth_view_attention(cameras, depths, neighbours, strides)
    canvas = None
    if mesh is not None and len(cameras) > 1:
        latent_cameras = [c.scaled(1 / latent_factor) for c in cameras]
        latent_depths = [latent_depth(d, latent_factor) for d in depths]
        size = canvas_size(latent_cameras, latent_depths, mesh)
        canvas = mesh_canvas(mesh, latent_cameras, latent_depths, size)
    return TrainingFree(attention, canvas, sync or SyncSettings(), known)


def panorama_training_free(unet, cameras: Sequence[Camera], neighbours: list[list[int]], latent_factor: int,
                           sync: SyncSettings | None = None) -> TrainingFree:
    """Attention over rotation correspondences and the equirect, poles included, as the canvas."""
    cameras = list(cameras)
    if len(cameras) < 2:
        return TrainingFree()
    strides = unet_level_strides(unet, cameras[0].width, cameras[0].height, latent_factor)
    attention = panorama_view_attention(cameras, neighbours, strides)
    canvas = equirect_canvas([c.scaled(1 / latent_factor) for c in cameras])
    return TrainingFree(attention, canvas, sync or SyncSettings())
