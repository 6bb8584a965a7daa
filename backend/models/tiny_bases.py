"""Tiny random-weight SD 1.5-, SD 2- and SDXL-shaped models with depth ControlNets, for tests.

They keep each family's *structure*: SD 1.5 and SD 2 have four UNet levels with cross attention
on the first three and one CLIP text encoder (SD 1.5's with quick GELU and convolutional
attention projections, SD 2's with GELU and linear ones); SDXL has three levels with cross
attention on the inner two, two text encoders whose penultimate states are concatenated, and
the pooled-text plus size "time ids" embedding. A ControlNet is built from its UNet, as real ones
are, and its depth encoder and zero-initialised output convolutions are then given random
weights, so that the depth image visibly changes the prediction. Every builder is deterministic for a seed and
leaves the global random state alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..validation import InputError
from .base_adapter import SD2_DEPTH, SD15_CONTROLNET, SDXL_CONTROLNET, BaseModelAdapter, ControlNetAdapter
from .tiny import MAX_TOKENS, TEXT_HIDDEN, _build, _seeded, tiny_scheduler, tiny_tokenizer, tiny_unet, tiny_vae

SDXL_TIME_EMBED = 8  # addition_time_embed_dim: each of the six time ids becomes this many features
SDXL_TEXT_2 = 48  # the second text encoder is wider than the first, as in SDXL (1280 against 768)
CONTROL_EMBEDDING = (8, 8, 16, 16)  # three stride-2 convolutions: depth image -> latent size, as in SD
SD_SCALING, SDXL_SCALING = 0.18215, 0.13025  # the VAE latent scaling factors of SD 1.x/2.x and SDXL
SHAPES = ("sd15", "sd2", "sdxl")


@dataclass
class TinyBase:
    """A tiny base model: its adapter (with or without ControlNet), VAE and noise schedule."""

    adapter: BaseModelAdapter
    vae: AutoencoderKL
    scheduler: SchedulerMixin


def tiny_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's layout: SD 2's levels with 8 heads everywhere and convolutional attention projections."""
    return _build(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            use_linear_projection=False,
        ),
    )


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's layout: three levels, none at the outermost attends, deeper transformers inside,
    text width of both encoders together, and the ``text_time`` added embedding."""
    return _build(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=TEXT_HIDDEN + SDXL_TEXT_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_TEXT_2,
        ),
    )


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A depth ControlNet copied from ``unet`` (diffusers' ``from_unet``) whose depth encoder and zero
    convolutions are random, so the control image matters."""
    with _seeded(seed), torch.no_grad():
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROL_EMBEDDING)
        # The depth encoder at a scale where depth, not just its presence, moves the prediction.
        for param in net.controlnet_cond_embedding.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        for module in (*net.controlnet_down_blocks, net.controlnet_mid_block):
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.05)
    return net.eval()


def tiny_clip(seed: int = 0, *, act: str = "gelu", projection: bool = False) -> CLIPTextModel:
    """A 2-layer CLIP text transformer; ``projection`` gives SDXL's wider second encoder (pooled + projected)."""
    width = SDXL_TEXT_2 if projection else TEXT_HIDDEN
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=width, hidden_act=act,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _build(seed, lambda: model_class(config).eval())


def tiny_family_vae(shape: str, seed: int = 0) -> AutoencoderKL:
    """The tiny VAE with the family's latent scaling factor."""
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=SDXL_SCALING if shape == "sdxl" else SD_SCALING)
    return vae


def tiny_controlnet_base(shape: str, seed: int = 0, *, with_controlnet: bool = True) -> TinyBase:
    """A tiny ``shape`` (``sd15``, ``sd2`` or ``sdxl``) UNet, with a depth ControlNet unless told not to."""
    if shape not in SHAPES:
        raise InputError("shape", f"must be one of {', '.join(SHAPES)}, got {shape!r}")
    if shape == "sdxl":
        unet = tiny_sdxl_unet(seed)
        encoders = [tiny_clip(seed + 2), tiny_clip(seed + 3, projection=True)]
    else:
        unet = tiny_sd15_unet(seed) if shape == "sd15" else tiny_unet("base", seed)
        encoders = [tiny_clip(seed + 2, act="quick_gelu" if shape == "sd15" else "gelu")]
    controlnet = tiny_controlnet(unet, seed + 4) if with_controlnet else None
    adapter = ControlNetAdapter(unet, controlnet, encoders, [tiny_tokenizer() for _ in encoders])
    return TinyBase(adapter.eval(), tiny_family_vae(shape, seed + 1), tiny_scheduler())


TINY_SHAPE_OF_KIND = {SD15_CONTROLNET: "sd15", SDXL_CONTROLNET: "sdxl"}


def tiny_base(kind: str, task: str, seed: int = 0) -> TinyBase:
    """The tiny model the engine serves for a base ``kind`` and a task (``depth`` or ``panorama``).

    ``sd2_depth`` is the tiny multi-view SD 2 model (random CAA blocks, as ``make-tiny-model``
    writes); the ControlNet kinds carry a ControlNet for the depth task only.
    """
    from .base_adapter import LatentChannelsAdapter
    from .tiny import tiny_multiview, tiny_pipeline

    if kind == SD2_DEPTH:
        sd2_kind = "depth" if task == "depth" else "base"
        pipe = tiny_pipeline(sd2_kind, seed)
        model = tiny_multiview(sd2_kind, pipe.unet, seed)
        return TinyBase(LatentChannelsAdapter(model, pipe.text_encoder, pipe.tokenizer), pipe.vae, pipe.scheduler)
    if kind not in TINY_SHAPE_OF_KIND:
        raise InputError("base_kind", f"must be one of {SD2_DEPTH}, {SD15_CONTROLNET}, {SDXL_CONTROLNET}; got {kind!r}")
    return tiny_controlnet_base(TINY_SHAPE_OF_KIND[kind], seed, with_controlnet=task == "depth")


def write_tiny_controlnet_base(shape: str, directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny ``shape`` model as a diffusers folder ``<shape>/`` (the layout of the SD 1.5 and SDXL
    repositories) and its ControlNet as ``<shape>-controlnet/``; returns both folders."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    base = tiny_controlnet_base(shape, seed)
    adapter = base.adapter
    parts = dict(vae=base.vae, unet=adapter.unet, scheduler=base.scheduler, text_encoder=adapter.text_encoders[0],
                 tokenizer=adapter.tokenizers[0])
    if adapter.xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=adapter.text_encoders[1],
                                         tokenizer_2=adapter.tokenizers[1])
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    root = Path(directory)
    model, controlnet = root / shape, root / f"{shape}-controlnet"
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the absent safety checker "cannot be saved": that is the intent
    try:
        pipe.save_pretrained(model, safe_serialization=True)
        adapter.controlnet.save_pretrained(controlnet, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    return model, controlnet
