"""Frames between keyframes without the trained interpolation module: the keyframes' canvas as known content.

The keyframes' final latents are blended onto the mesh's atlas (the same canvas the keyframes
were synchronised on) and looked up from every in-between frame. Where a frame sees canvas the
keyframes saw, that content is known: the frame's denoising keeps it at every step (through the
clean estimate, re-noised to the step's level with the step's own noise) and adds only what the
keyframes did not see, tied to the other frames of its batch by attention and synchronisation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.canvas import canvas_size, latent_depth, mesh_canvas
from ..geometry.keyframes import KeyframePlan
from ..geometry.mesh import Mesh
from .keyframes import KeyframePipeline
from .sampling import SamplingSettings, StepInfo
from .training_free import KnownContent

WindowProgress = Callable[[int, int, StepInfo], None]


def known_from_keyframes(
    keyframe_latents: torch.Tensor, keyframes: Sequence[int], frames: Sequence[int], cameras: Sequence[Camera],
    depths: Sequence[np.ndarray], mesh: Mesh, latent_factor: int,
) -> KnownContent:
    """What each of ``frames`` sees of the canvas baked from the keyframes' latents (V_k, C, h, w)."""
    order = [*keyframes, *frames]
    latent_cameras = [cameras[i].scaled(1 / latent_factor) for i in order]
    latent_depths = [latent_depth(depths[i], latent_factor) for i in order]
    canvas = mesh_canvas(mesh, latent_cameras, latent_depths, canvas_size(latent_cameras, latent_depths, mesh))
    latents = keyframe_latents.float().cpu()
    views = torch.cat([latents, torch.zeros(len(frames), *latents.shape[1:])])
    sources = torch.zeros(len(order), dtype=torch.bool)
    sources[: len(keyframes)] = True
    values, mask = canvas.project(views, sources)
    return KnownContent(values[len(keyframes):], mask[len(keyframes):])


def fill_between(
    pipeline: KeyframePipeline, plan: KeyframePlan, keyframe_latents: torch.Tensor, prompts: Sequence[str],
    cameras: Sequence[Camera], depths: Sequence[np.ndarray], mesh: Mesh | None, settings: SamplingSettings,
    max_in_between: int, *, progress: WindowProgress | None = None, cancel: threading.Event | None = None,
) -> dict[int, np.ndarray]:
    """Every in-between frame of ``plan`` (frame index -> uint8 image), in batches of ``max_in_between``.

    ``keyframe_latents`` are the final latents of ``plan.keyframes``, in that order. The pipeline's
    mode decides how a batch is tied together; only ``training_free`` reads the keyframes' canvas
    (an ``independent`` pipeline generates every frame alone).
    """
    batches = [frames[start:start + max_in_between] for _, _, frames in plan.windows
               for start in range(0, len(frames), max_in_between)]
    images: dict[int, np.ndarray] = {}
    for number, batch in enumerate(batches):
        known = None
        if pipeline.mode == "training_free" and mesh is not None:
            known = known_from_keyframes(keyframe_latents, plan.keyframes, batch, cameras, depths, mesh,
                                         pipeline.sampler.latent_factor)

        def step_progress(info: StepInfo, number=number) -> None:
            if progress is not None:
                progress(number, len(batches), info)

        result = pipeline([prompts[i] for i in batch], [cameras[i] for i in batch], [depths[i] for i in batch],
                          settings, progress=step_progress, cancel=cancel, mesh=mesh, known=known)
        images.update(zip(batch, result.images, strict=True))
    return images
