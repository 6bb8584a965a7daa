"""Panorama: text -> perspective views around one centre (ring and poles), generated jointly.

Views are tied together by CAA over rotation correspondences (3 x 3 neighbourhoods in each
neighbour). With every CAA block at zero this is, view for view, diffusers'
``StableDiffusionPipeline`` given the same starting latents.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.panorama import neighbour_views
from ..models.caa_geometry import panorama_geometry
from ..validation import InputError
from .sampling import MultiViewSampler, ProgressCallback, SamplingSettings, to_uint8, view_prompts


@dataclass
class PanoramaResult:
    images: np.ndarray  # uint8 (V, H, W, 3), or float in [0, 1] when asked
    latents: torch.Tensor
    cameras: list[Camera]


class PanoramaPipeline:
    """Generate the views of a panorama layout jointly from one prompt or one per view."""

    def __init__(self, sampler: MultiViewSampler):
        if sampler.model.task != "panorama":
            raise InputError("model", "the panorama pipeline needs the panorama multi-view UNet")
        self.sampler = sampler

    def __call__(
        self,
        prompts: str | Sequence[str],
        cameras: list[Camera],
        settings: SamplingSettings | None = None,
        *,
        neighbours: list[list[int]] | None = None,
        latents: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        output_float: bool = False,
    ) -> PanoramaResult:
        settings = (settings or SamplingSettings()).validated()
        views = len(cameras)
        if views == 0:
            raise InputError("cameras", "need at least one view")
        width, height = cameras[0].width, cameras[0].height
        factor = 8 * self.sampler.latent_factor
        if any((c.width, c.height) != (width, height) for c in cameras) or width % factor or height % factor:
            raise InputError("cameras", f"all views must share one size, a multiple of {factor} pixels")
        prompts = view_prompts(prompts, views)
        geometry = None
        if views > 1:
            neighbours = neighbour_views(cameras) if neighbours is None else neighbours
            raw = panorama_geometry(cameras, neighbours)
            geometry = {key: level.to(self.sampler.device, self.sampler.dtype) for key, level in raw.items()}
        if latents is None:
            latents = self.sampler.initial_noise(views, height, width, settings.seed)
        text = self.sampler.encode_text(prompts)
        negative = self.sampler.encode_text([settings.negative_prompt] * views)
        latents = self.sampler.denoise(latents, text, negative, settings, geometry, None, progress, cancel)
        images = self.sampler.decode(latents)
        return PanoramaResult(images if output_float else to_uint8(images), latents, cameras)
