"""Interpolation: the frames between two generated keyframes, conditioned on both.

Each window ``[keyframe a, in-between frames..., keyframe b]`` is denoised jointly (CAA over the
window's overlap graph), with the two keyframes' VAE latents and a keyframe mask fed to the
image-condition branch. Only the in-between outputs are kept; keyframes keep their own images.
Every window of the trajectory is generated (the released code only ever ran the first), and a
long window is cut into batches that each carry both keyframes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.keyframes import KeyframePlan
from ..validation import InputError, rgb_image
from .keyframes import KeyframePipeline
from .sampling import Cancelled, ProgressCallback, SamplingSettings, StepInfo, view_prompts

WindowProgress = Callable[[int, int, StepInfo], None]


@dataclass
class InterpolationResult:
    images: dict[int, np.ndarray]  # frame index -> uint8 (H, W, 3), in-between frames only


class InterpolationPipeline:
    """Fills every window of a keyframe plan; wraps a keyframe pipeline whose model has a condition branch."""

    def __init__(self, keyframes: KeyframePipeline, max_in_between: int = 10):
        if keyframes.sampler.model.condition is None:
            raise InputError("model", "interpolation needs the multi-view UNet with its condition branch")
        if max_in_between < 1:
            raise InputError("max_in_between", f"must be >= 1, got {max_in_between}")
        self.keyframes, self.max_in_between = keyframes, max_in_between

    @property
    def sampler(self):
        return self.keyframes.sampler

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (V, H, W, 3) -> scaled VAE latents (the distribution's mean: deterministic)."""
        pixels = torch.from_numpy(np.asarray(images)).to(self.sampler.device, self.sampler.dtype)
        pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
        latents = self.sampler.vae.encode(pixels).latent_dist.mean
        return latents * self.sampler.vae.config.scaling_factor

    def __call__(
        self,
        plan: KeyframePlan,
        keyframe_images: dict[int, np.ndarray],
        prompts: str | Sequence[str],
        cameras: list[Camera],
        depths: list[np.ndarray],
        settings: SamplingSettings | None = None,
        *,
        progress: WindowProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> InterpolationResult:
        settings = (settings or SamplingSettings()).validated()
        prompts = view_prompts(prompts, len(cameras))
        if len(depths) != len(cameras):
            raise InputError("depths", f"expected one depth map per camera ({len(cameras)}), got {len(depths)}")
        for k in plan.keyframes:
            if k not in keyframe_images:
                raise InputError("keyframe_images", f"missing the image of keyframe {k}")
            rgb_image(f"keyframe_images[{k}]", keyframe_images[k], cameras[k].height, cameras[k].width)
        batches = [
            (a, b, frames[start : start + self.max_in_between])
            for a, b, frames in plan.windows
            for start in range(0, len(frames), self.max_in_between)
        ]
        images: dict[int, np.ndarray] = {}
        for number, (a, b, frames) in enumerate(batches):
            if cancel is not None and cancel.is_set():  # before the VAE encodes this batch's keyframes
                raise Cancelled(f"cancelled before interpolation batch {number + 1} of {len(batches)}")
            window = [a, *frames, b]
            latents = self.encode_images(np.stack([keyframe_images[a], keyframe_images[b]]))
            condition = torch.zeros(len(window), 5, *latents.shape[-2:], device=latents.device, dtype=latents.dtype)
            condition[0, :4], condition[-1, :4] = latents[0], latents[1]
            condition[0, 4] = condition[-1, 4] = 1.0
            step_progress = None if progress is None else _window_progress(progress, number, len(batches))
            result = self.keyframes(
                [prompts[i] for i in window], [cameras[i] for i in window], [depths[i] for i in window],
                settings, condition=condition, progress=step_progress, cancel=cancel,
            )
            for frame, image in zip(frames, result.images[1:-1], strict=True):
                images[frame] = image
        return InterpolationResult(images)


def _window_progress(progress: WindowProgress, number: int, total: int) -> ProgressCallback:
    def report(info: StepInfo) -> None:
        progress(number, total, info)

    return report
