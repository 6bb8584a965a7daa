"""Keyframes: text + depth -> N views of a scene generated jointly (the depth task).

Every view is conditioned on its own depth map, as its base model takes depth (SD 2 depth's
fifth input channel, or a depth ControlNet's image: ``backend/models/base_adapter.py``), and,
with the trained multi-view UNet, on the other views through CAA over the overlap graph. With
every CAA block at zero this is, view for view, diffusers' ``StableDiffusionDepth2ImgPipeline``
at strength 1 given the same depth channel and the same starting latents; on an SD 1.5 or SDXL
base it is ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.correspondence import overlap_matrix
from ..models.caa_geometry import depth_geometry, released_depth_neighbours
from ..validation import InputError, depth_map
from .sampling import MultiViewSampler, ProgressCallback, SamplingSettings, to_uint8, view_prompts


@dataclass
class KeyframeResult:
    images: np.ndarray  # uint8 (V, H, W, 3)
    latents: torch.Tensor
    # Views that share no valid correspondence with any other view. They cannot attend to
    # anything, so each is generated on its own from its prompt and depth alone; callers report
    # them, since such a view will not match its neighbours where the textures meet.
    isolated_views: list[int] = field(default_factory=list)


def isolated_views(geometry: dict | None, views: int) -> list[int]:
    """The views without a single valid key token at the finest level of ``geometry``."""
    if geometry is None:
        return list(range(views)) if views > 1 else []
    finest = geometry[max(geometry, key=lambda size: size[0] * size[1])]
    connected = torch.zeros(views, dtype=torch.bool)
    for owners, part in finest.groups():
        connected[slice(None) if owners is None else owners.cpu()] |= part.valid.flatten(1).any(dim=1).cpu()
    return [int(v) for v in torch.nonzero(~connected).flatten()]


class KeyframePipeline:
    """Generate views of a scene jointly from per-view prompts and depth maps."""

    def __init__(self, sampler: MultiViewSampler, neighbour_threshold: float = 0.3):
        if sampler.model.task != "depth":
            raise InputError("model", "the keyframe pipeline needs the depth-task multi-view UNet")
        self.sampler = sampler
        self.neighbour_threshold = neighbour_threshold

    def __call__(
        self,
        prompts: str | Sequence[str],
        cameras: list[Camera],
        depths: list[np.ndarray],
        settings: SamplingSettings | None = None,
        *,
        neighbours: list[list[int]] | None = None,
        overlap: np.ndarray | None = None,
        latents: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        output_float: bool = False,
        condition: torch.Tensor | None = None,
    ) -> KeyframeResult:
        settings = (settings or SamplingSettings()).validated()
        width, height = self.sampler.check_views(cameras)
        views = len(cameras)
        if len(depths) != views:
            raise InputError("depths", f"expected one depth map per camera ({views}), got {len(depths)}")
        depths = [depth_map(f"depths[{k}]", d, height, width) for k, d in enumerate(depths)]
        prompts = view_prompts(prompts, views)

        released = self.sampler.model.released
        trained = self.sampler.adapter.trained_multiview
        if not trained:
            neighbours = [[] for _ in range(views)]  # no CAA blocks: nothing reads a CAA geometry
        elif neighbours is None and released and views > 1:
            neighbours = released_depth_neighbours(cameras, depths)  # the rule the released weights know
        elif neighbours is None:
            if overlap is None and views > 1:
                overlap = overlap_matrix(cameras, depths, stride=8)
            neighbours = self._neighbours(overlap, views)
        geometry = None
        if views > 1 and any(neighbours):
            geometry = self.sampler.on_device(depth_geometry(cameras, depths, neighbours, released=released))
        control = self.sampler.adapter.depth_control(depths, height, width, self.sampler.latent_factor)
        images, latents = self.sampler.generate(
            prompts, (width, height), settings, geometry, latents=latents, control=control, condition=condition,
            progress=progress, cancel=cancel,
        )
        isolated = isolated_views(geometry, views) if trained else []
        return KeyframeResult(images if output_float else to_uint8(images), latents, isolated)

    def _neighbours(self, overlap: np.ndarray | None, views: int) -> list[list[int]]:
        """Every view whose symmetric overlap passes the threshold (the released rule)."""
        if overlap is None:
            return [[] for _ in range(views)]
        overlap = np.minimum(overlap, np.asarray(overlap).T)
        return [[j for j in range(views) if j != i and overlap[i, j] > self.neighbour_threshold] for i in range(views)]
