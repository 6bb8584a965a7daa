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
from ..geometry.mesh import Mesh
from ..models.caa_geometry import depth_geometry, released_depth_neighbours
from ..validation import InputError, depth_map
from .sampling import MultiViewSampler, ProgressCallback, SamplingSettings, to_uint8, view_prompts
from .training_free import KnownContent, SyncSettings, TrainingFree, check_mode, depth_training_free


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
    """Generate views of a scene jointly from per-view prompts and depth maps.

    ``mode`` (:data:`~backend.pipelines.training_free.MODES`): ``trained`` ties views through the
    CAA blocks, ``training_free`` through the base model's own attention and, given the job's
    UV-mapped mesh, canvas synchronisation on its atlas; ``independent`` generates each view alone.
    """

    def __init__(self, sampler: MultiViewSampler, neighbour_threshold: float = 0.3, mode: str = "trained",
                 sync: SyncSettings | None = None):
        if sampler.model.task != "depth":
            raise InputError("model", "the keyframe pipeline needs the depth-task multi-view UNet")
        self.sampler = sampler
        self.neighbour_threshold = neighbour_threshold
        self.mode = check_mode("mode", mode)
        self.sync = sync or SyncSettings()

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
        mesh: Mesh | None = None,
        known: KnownContent | None = None,
    ) -> KeyframeResult:
        """Views for ``cameras``; ``mesh`` (with UVs) is the training-free mode's canvas and
        ``known`` (training-free mode) content some views must keep. ``neighbours`` names the
        trained blocks' key views; the training-free mode takes each view's most overlapping
        views from ``overlap`` instead."""
        settings = (settings or SamplingSettings()).validated()
        width, height = self.sampler.check_views(cameras)
        views = len(cameras)
        if len(depths) != views:
            raise InputError("depths", f"expected one depth map per camera ({views}), got {len(depths)}")
        depths = [depth_map(f"depths[{k}]", d, height, width) for k, d in enumerate(depths)]
        prompts = view_prompts(prompts, views)

        control = self.sampler.adapter.depth_control(depths, height, width, self.sampler.latent_factor)
        geometry, extras = None, None
        if self.mode == "trained":
            geometry = self._caa_geometry(cameras, depths, neighbours, overlap)
        elif self.mode == "training_free":
            if overlap is None and views > 1:
                overlap = overlap_matrix(cameras, depths, stride=8)
            extras = depth_training_free(self.sampler.model.unet, cameras, depths, overlap,
                                         self.sampler.latent_factor, mesh, self.sync, known)
        images, latents = self.sampler.generate(
            prompts, (width, height), settings, geometry, latents=latents, control=control, condition=condition,
            progress=progress, cancel=cancel, training_free=extras,
        )
        if self.mode == "training_free":
            isolated = _unlinked(extras, views)
        else:  # independent views are alone by request, not for want of overlap
            isolated = isolated_views(geometry, views) if self.mode == "trained" else []
        return KeyframeResult(images if output_float else to_uint8(images), latents, isolated)

    def _caa_geometry(self, cameras, depths, neighbours, overlap) -> dict | None:
        """The trained CAA blocks' geometry over the overlap graph (None: no view has a neighbour)."""
        views = len(cameras)
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
        if views > 1 and any(neighbours):
            return self.sampler.on_device(depth_geometry(cameras, depths, neighbours, released=released))
        return None

    def _neighbours(self, overlap: np.ndarray | None, views: int) -> list[list[int]]:
        """Every view whose symmetric overlap passes the threshold (the released rule)."""
        if overlap is None:
            return [[] for _ in range(views)]
        overlap = np.minimum(overlap, np.asarray(overlap).T)
        return [[j for j in range(views) if j != i and overlap[i, j] > self.neighbour_threshold] for i in range(views)]


def _unlinked(extras: TrainingFree, views: int) -> list[int]:
    """Views the training-free tools tie to nothing: no neighbour to attend to, no shared canvas."""
    if views < 2:
        return []
    linked = set()
    if extras.attention is not None:
        linked |= {i for i, row in enumerate(extras.attention.neighbours) if row}
    if extras.canvas is not None:
        linked |= {int(v) for v in torch.unique(extras.canvas.splat_view)}
    return [v for v in range(views) if v not in linked]
