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
from .training_free import SyncSettings, check_mode, panorama_training_free


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
    """Generate the views of a panorama layout jointly from one prompt or one per view.

    ``mode`` (:data:`~backend.pipelines.training_free.MODES`): ``trained`` ties views through the
    CAA blocks, ``training_free`` through the base model's own attention and synchronisation on
    the equirect, ``independent`` generates each view alone.
    """

    def __init__(self, sampler: MultiViewSampler, mode: str = "trained", sync: SyncSettings | None = None):
        if sampler.model.task != "panorama":
            raise InputError("model", "the panorama pipeline needs the panorama multi-view UNet")
        self.sampler = sampler
        self.mode = check_mode("mode", mode)
        self.sync = sync or SyncSettings()

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
        geometry, extras = None, None
        if len(cameras) > 1 and self.mode == "trained" and self.sampler.adapter.trained_multiview:
            released = self.sampler.model.released
            if neighbours is None:
                neighbours = released_neighbours(cameras) if released else neighbour_views(cameras)
            geometry = self.sampler.on_device(panorama_geometry(cameras, neighbours, released=released))
        elif len(cameras) > 1 and self.mode == "training_free":
            neighbours = neighbour_views(cameras) if neighbours is None else neighbours
            extras = panorama_training_free(self.sampler.model.unet, cameras, neighbours, self.sampler.latent_factor,
                                            self.sync)
        images, latents = self.sampler.generate(
            prompts, size, settings, geometry, latents=latents, progress=progress, cancel=cancel,
            training_free=extras,
        )
        return PanoramaResult(images if output_float else to_uint8(images), latents, cameras)
