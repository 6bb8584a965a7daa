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
from ..models.caa_geometry import panorama_geometry, released_panorama_neighbours
from ..validation import InputError
from .sampling import MultiViewSampler, ProgressCallback, SamplingSettings, to_uint8, view_prompts


@dataclass
class PanoramaResult:
    images: np.ndarray  # uint8 (V, H, W, 3), or float in [0, 1] when asked
    latents: torch.Tensor
    cameras: list[Camera]


def released_neighbours(cameras: list[Camera]) -> list[list[int]]:
    """Key views for the released weights: a level ring reads its two ring neighbours, as trained.

    The released model never saw pole views; with poles in the layout every view reads the
    views it overlaps, through the released token rules, which is the closest it gets.
    """
    level = all(abs(camera.cam_to_world[2, 2]) < 1e-6 for camera in cameras)  # optical axes horizontal
    return released_panorama_neighbours(len(cameras)) if level else neighbour_views(cameras)


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
        size = self.sampler.check_views(cameras)
        prompts = view_prompts(prompts, len(cameras))
        geometry = None
        if len(cameras) > 1 and self.sampler.adapter.trained_multiview:
            released = self.sampler.model.released
            if neighbours is None:
                neighbours = released_neighbours(cameras) if released else neighbour_views(cameras)
            geometry = self.sampler.on_device(panorama_geometry(cameras, neighbours, released=released))
        images, latents = self.sampler.generate(
            prompts, size, settings, geometry, latents=latents, progress=progress, cancel=cancel
        )
        return PanoramaResult(images if output_float else to_uint8(images), latents, cameras)
