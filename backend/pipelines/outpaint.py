"""Panorama from an image: the given view is kept, the other views are generated around it.

This is SD 2 inpainting's input convention per view: noisy latent (4 channels), mask (1: 1 =
generate, 0 = keep) and the masked image's latent (4). The first camera shows the given image
(mask 0); every other view is masked entirely and starts from a grey image. All views are
denoised together, tied by CAA, so the new views continue the given one. With every CAA block at
zero this is, view for view, diffusers' ``StableDiffusionInpaintPipeline`` given the same
masked-image latents and starting latents.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry.cameras import Camera
from ..geometry.panorama import neighbour_views
from ..models.caa_geometry import panorama_geometry
from ..validation import InputError, rgb_image
from .panorama import PanoramaResult
from .sampling import MultiViewSampler, ProgressCallback, SamplingSettings, to_uint8, view_prompts


class PanoramaOutpaintPipeline:
    """Generate a panorama layout around one given view (the first camera's)."""

    def __init__(self, sampler: MultiViewSampler):
        if sampler.model.task != "panorama":
            raise InputError("model", "outpainting needs the panorama multi-view UNet")
        if sampler.model.unet.config.in_channels != 9:
            raise InputError("model", "outpainting needs an SD 2 inpainting UNet (9 input channels)")
        self.sampler = sampler

    @torch.no_grad()
    def conditioning(self, image: np.ndarray, views: int, height: int, width: int) -> torch.Tensor:
        """(V, 5, h, w): mask and masked-image latent of every view, the given image in view 0."""
        sampler = self.sampler
        pixels = torch.zeros(views, 3, height, width, device=sampler.device, dtype=sampler.dtype)
        pixels[0] = torch.from_numpy(image).to(sampler.device, sampler.dtype).permute(2, 0, 1) / 127.5 - 1.0
        latents = torch.cat([
            sampler.vae.encode(view[None]).latent_dist.mean for view in pixels
        ]) * sampler.vae.config.scaling_factor
        mask = torch.ones(views, 1, height, width, device=sampler.device, dtype=sampler.dtype)
        mask[0] = 0.0
        mask = F.interpolate(mask, size=latents.shape[-2:])
        return torch.cat([mask, latents], dim=1)

    def __call__(
        self,
        image: np.ndarray,
        prompts: str | Sequence[str],
        cameras: list[Camera],
        settings: SamplingSettings | None = None,
        *,
        neighbours: list[list[int]] | None = None,
        latents: torch.Tensor | None = None,
        conditioning: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        output_float: bool = False,
    ) -> PanoramaResult:
        settings = (settings or SamplingSettings()).validated()
        width, height = self.sampler.check_views(cameras)
        image = rgb_image("image", image, height, width)
        prompts = view_prompts(prompts, len(cameras))
        geometry = None
        if len(cameras) > 1:
            neighbours = neighbour_views(cameras) if neighbours is None else neighbours
            geometry = self.sampler.on_device(panorama_geometry(cameras, neighbours))
        if conditioning is None:
            conditioning = self.conditioning(image, len(cameras), height, width)
        images, latents = self.sampler.generate(
            prompts, (width, height), settings, geometry, latents=latents, control=conditioning,
            progress=progress, cancel=cancel,
        )
        return PanoramaResult(images if output_float else to_uint8(images), latents, cameras)
