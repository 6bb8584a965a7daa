"""The models a training run starts from and writes: the tiny base (with a box-codec VAE) or a
real SD 2 checkpoint of the task (depth, or base for panoramas), the multi-view additions, and
the export as a diffusers folder."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.mv_unet import MultiViewUNet
from ..models.serving import TASKS
from ..models.tiny import CAA_WEIGHTS, sd2_pipeline, tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet
from ..models.weights import save_added_weights
from ..validation import InputError
from .config import TrainConfig


def model_kind(task: str) -> str:
    """The SD 2 kind a task's model is built on (``depth``, or ``base`` for panoramas): also its
    folder name under ``RUN/model``, the layout ``ModelConfig(root=...)`` reads."""
    return TASKS[task]


@dataclass
class TrainModels:
    """What training touches: the multi-view UNet (base UNet + additions), VAE, text side, noise schedule."""

    model: MultiViewUNet
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object

    @property
    def unet(self) -> nn.Module:
        return self.model.unet


def tiny_autoencoder(channels: Sequence[int], groups: int, seed: int = 0):
    """A factor-8, 4-channel ``AutoencoderKL`` small enough to train on a CPU in minutes."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=groups, sample_size=64,
            scaling_factor=1.0,
        )


BOX_CARRIER = 50.0  # the constant carrier pair that pins every GroupNorm's statistics (see box_autoencoder)
BOX_OFFSET = 12.0  # added before each output SiLU so it runs where SiLU(z) = z to 1e-4


@torch.no_grad()
def box_autoencoder(vae, carrier: float = BOX_CARRIER, offset: float = BOX_OFFSET):
    """Set an ``AutoencoderKL``'s weights so it is the box codec: 8x8 mean colour in, nearest upsampling out.

    A randomly initialised tiny VAE does not preserve colour (its GroupNorms normalise every image
    away) and training one to do so takes far longer than this budget. Here the encoder's
    latents are the mean colour of each 8 x 8 block (channels 0-2, the RGB of [-1, 1] images;
    channel 3 starts at zero, free for training to use) and the decoder repeats them over the
    block, exactly up to float rounding: on the synthetic rooms that is 19.9 dB, what an ideal
    8x-average / nearest codec gets. Every residual branch (resnets, the mid attention) starts at
    zero, so the skeleton is linear except for the output GroupNorm + SiLU pairs, which are made
    linear too: each channel travels with its negation (group means are exactly zero) next to
    a pair of constant channels of size ``carrier`` (group variances are a known constant), and
    an ``offset`` before each SiLU keeps it in its linear range; the output convolutions read
    half the difference of each pair. The posterior log-variance starts at -10.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    channels = list(vae.config.block_out_channels)
    groups = vae.config.norm_num_groups
    if min(channels) // groups < 8 or vae.config.latent_channels < 3:
        raise InputError("model.vae_groups", "the box codec needs 8 channels in each GroupNorm's first group")

    def identity(conv, scale=1.0, taps=((1, 1),)):
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(8):
            for ky, kx in taps:
                conv.weight[c, c, ky, kx] = scale

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                identity(module.conv_shortcut, taps=((0, 0),))
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif isinstance(module, Downsample2D):  # stride 2, padded right/bottom: taps 0 and 1 are the 2x2 block
            identity(module.conv, 0.25, ((0, 0), (0, 1), (1, 0), (1, 1)))
        elif isinstance(module, Upsample2D):  # after a nearest x2
            identity(module.conv)

    def lift(conv):  # RGB (or the first three latents) -> (c, -c) pairs, then the constant pair
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(3):
            conv.weight[2 * k, k, 1, 1], conv.weight[2 * k + 1, k, 1, 1] = 1.0, -1.0
        conv.bias[6], conv.bias[7] = carrier, -carrier

    def linear_norm(norm):  # divides by the carrier's known share of the group's deviation, then shifts
        per_group = norm.num_channels // norm.num_groups
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.weight[:6] = carrier * math.sqrt(2.0 / per_group)
        norm.bias[:6] = offset
        # The carrier pair only pins the statistics: its outputs sit deep in SiLU's flat zero, so
        # nothing downstream reads a value of size ``carrier``.
        norm.weight[6:8] = 0.0
        norm.bias[6:8] = -2.0 * offset

    def read(conv):
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(3):
            conv.weight[k, 2 * k, 1, 1], conv.weight[k, 2 * k + 1, 1, 1] = 0.5, -0.5

    encoder, decoder = vae.encoder, vae.decoder
    lift(encoder.conv_in)
    linear_norm(encoder.conv_norm_out)
    read(encoder.conv_out)
    encoder.conv_out.bias[vae.config.latent_channels:] = -10.0
    lift(decoder.conv_in)
    linear_norm(decoder.conv_norm_out)
    read(decoder.conv_out)
    for conv in (vae.quant_conv, vae.post_quant_conv):
        if conv is not None:
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 0, 0] = 1.0
    return vae


def build_models(config: TrainConfig, device: torch.device | str = "cpu") -> TrainModels:
    """The base model of the recipe's task, with zero-initialised CAA blocks (and, for the depth
    task, their ResNets and the condition branch)."""
    m, kind = config.model, model_kind(config.task)
    if m.base == "tiny":
        unet = tiny_unet(kind, m.seed, m.unet_groups)
        vae = tiny_autoencoder(m.vae_channels, m.vae_groups, m.seed + 1)
        if m.vae_init == "box":
            box_autoencoder(vae)
        text_encoder, tokenizer, scheduler = tiny_text_encoder(m.seed + 2), tiny_tokenizer(), tiny_scheduler()
    else:
        from ..models.loading import load_components

        parts = load_components(m.base, kind)
        unet, vae, text_encoder, tokenizer, scheduler = (
            parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler
        )
    model = MultiViewUNet(unet, config.task, with_condition=config.task == "depth")
    for module in (model, vae, text_encoder):
        module.to(device).eval()
    text_encoder.requires_grad_(False).eval()
    return TrainModels(model, vae, text_encoder, tokenizer, scheduler)


def export_model(models: TrainModels, folder: str | os.PathLike) -> Path:
    """Write the model as a diffusers folder of its SD 2 kind with ``caa.safetensors`` (what ModelSet loads)."""
    from diffusers.utils import logging as diffusers_logging

    folder = Path(folder)
    pipeline = sd2_pipeline(
        model_kind(models.model.task), unet=models.unet, vae=models.vae, text_encoder=models.text_encoder,
        tokenizer=models.tokenizer, scheduler=models.scheduler,
    )
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the absent optional components "cannot be saved": intended
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    save_added_weights(models.model, folder / CAA_WEIGHTS)
    return folder


def caa_in_float32(model: MultiViewUNet) -> None:
    """Run the CAA blocks outside autocast, in float32, as the rest of the UNet runs in bf16/fp16.

    Their token lookups (``embedding_bag`` with per-token weights) need features and weights of
    one dtype, which autocast does not arrange; the blocks are a small share of the compute.
    """
    blocks = [*model.caa_down, model.caa_mid, *model.caa_up]
    for block in blocks:
        forward = block.forward

        def run(hidden, geometry, forward=forward):
            with torch.autocast(hidden.device.type, enabled=False):
                return forward(hidden.float(), geometry).to(hidden.dtype)

        block.forward = run
