"""Training data as tensors: images, depth channels, prompt embeddings and latents, computed once."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..geometry.cameras import Camera
from ..models.depth_control import depth_channel
from ..validation import InputError
from .models import TrainModels


@dataclass
class PreparedData:
    """Training trajectories as tensors, with what every step reads computed once.

    ``images`` (N, V, 3, H, W) in [-1, 1]; ``depth_channels`` (N, V, 1, h, w) (the depth UNet's
    fifth input; (N, V, 0, h, w) for panoramas, whose UNet takes the latents alone);
    ``prompt_index`` (N, V) into ``embeddings`` (P, tokens, dim), whose row 0 is the empty
    prompt; ``latents`` (N, V, 4, h, w) scaled VAE means, set once the autoencoder is final;
    ``geometry`` per sample, built on first use; ``depths`` None for panoramas.
    """

    cameras: list[list[Camera]]
    depths: list[np.ndarray | None]
    images: torch.Tensor
    depth_channels: torch.Tensor
    prompt_index: torch.Tensor
    embeddings: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None
    geometry: list | None = None

    @property
    def count(self) -> int:
        return self.images.shape[0]

    @property
    def views(self) -> int:
        return self.images.shape[1]


def prepare_data(samples: Sequence, latent_factor: int = 8, task: str = "depth") -> PreparedData:
    """Stack samples (:class:`~backend.train.samples.MultiViewSample`) of ``task``, one view count and size."""
    if not samples:
        raise InputError("data", "no training samples")
    first = samples[0]
    views, (width, height) = first.num_views, first.size
    prompts: dict[str, int] = {"": 0}
    images, channels, index, cameras, depths = [], [], [], [], []
    for k, sample in enumerate(samples):
        sample.validate()
        if sample.task != task:
            raise InputError(f"data[{k}]", f"is a {sample.task} sample; the recipe trains the {task} model")
        if sample.num_views != views or sample.size != (width, height):
            raise InputError(f"data[{k}]", f"has {sample.num_views} views of {sample.size}, the first "
                             f"{views} of {(width, height)}")
        images.append(torch.from_numpy(np.ascontiguousarray(sample.images)).permute(0, 3, 1, 2))
        size = (height // latent_factor, width // latent_factor)
        if task == "depth":
            channels.append(torch.stack([depth_channel(d, *size) for d in sample.depths]))
        else:
            channels.append(torch.zeros(views, 0, *size))
        index.append([prompts.setdefault(p, len(prompts)) for p in sample.prompts])
        cameras.append(list(sample.cameras))
        depths.append(None if sample.depths is None else np.asarray(sample.depths, np.float32))
    stacked = torch.stack(images).float() / 127.5 - 1.0
    return PreparedData(cameras, depths, stacked, torch.stack(channels), torch.tensor(index), prompts=list(prompts))


@torch.no_grad()
def encode_prompts(models: TrainModels, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """Text embeddings (P, tokens, dim) of ``prompts`` with the frozen text encoder, on the CPU."""
    device = next(models.text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch):
        ids = models.tokenizer(
            prompts[start:start + batch], padding="max_length", max_length=models.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)
        out.append(models.text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block (its kernels can differ in train mode), restored afterwards."""
    mode = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(mode)


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Unscaled VAE posterior means of images (..., 3, H, W) in [-1, 1] (deterministic, as interpolation encodes)."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    flat = images.reshape(-1, *images.shape[-3:])
    with evaluating(vae):
        out = [vae.encode(flat[s:s + batch].to(device, dtype)).latent_dist.mean.float().cpu()
               for s in range(0, len(flat), batch)]
    latents = torch.cat(out)
    return latents.reshape(*images.shape[:-3], *latents.shape[-3:])


@torch.no_grad()
def reconstruction_psnr(vae: nn.Module, images: torch.Tensor, batch: int = 64) -> float:
    """PSNR (dB, images in [0, 1]) of decode(mean latent) against the images (..., 3, H, W) in [-1, 1]."""
    device = next(vae.parameters()).device
    flat = images.reshape(-1, *images.shape[-3:])
    error, count = 0.0, 0
    with evaluating(vae):
        for s in range(0, len(flat), batch):
            x = flat[s:s + batch].to(device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            error += float(((y - x) / 2).float().pow(2).sum())
            count += x.numel()
    return -10.0 * math.log10(max(error / count, 1e-12))


def drop_prompts(count: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) bool: which samples train with the empty prompt instead of their own."""
    return torch.rand(count, generator=generator) < rate


def interpolation_condition(latents: torch.Tensor, keyframes: torch.Tensor) -> torch.Tensor:
    """The condition branch's input (N, 5, h, w): keyframe latents and mask; zeros for every other view.

    ``latents`` (N, 4, h, w) are ground truth for every view; only the rows of ``keyframes`` are
    read, so the views the step generates never reach the branch.
    """
    condition = torch.zeros(latents.shape[0], 5, *latents.shape[-2:], dtype=latents.dtype, device=latents.device)
    condition[keyframes, :4] = latents[keyframes]
    condition[keyframes, 4] = 1.0
    return condition
