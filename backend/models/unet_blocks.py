"""The diffusers UNet blocks the multi-view hooks know, checked before any hook is installed.

:class:`~backend.models.mv_unet.MultiViewUNet` runs its added blocks from forward hooks on
diffusers' own blocks, relying on how each block calls its resampler and what it returns. A
diffusers release that renames or restructures those blocks would make the hooks fire at the
wrong place, or not at all, without any error: so every block is checked against the classes the
hooks were written for, and an unknown one stops the load with a message that names it.
"""

from __future__ import annotations

import diffusers
from diffusers.models.downsampling import Downsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from diffusers.models.upsampling import Upsample2D
from torch import nn

TESTED_DIFFUSERS = ">=0.31,<0.43"
"""The diffusers versions the hooks are tested with; pyproject.toml pins the same range."""

KNOWN_BLOCKS: dict[str, tuple[type, ...]] = {
    "down_blocks": (CrossAttnDownBlock2D, DownBlock2D),
    "mid_block": (UNetMidBlock2DCrossAttn,),
    "up_blocks": (CrossAttnUpBlock2D, UpBlock2D),
    "downsamplers": (Downsample2D,),
    "upsamplers": (Upsample2D,),
    "mid_block.attentions": (Transformer2DModel,),
}


def check_unet_blocks(unet: nn.Module) -> None:
    """Raise ``TypeError`` naming the first block of ``unet`` the hooks were not written for."""
    for kind, name, block in _blocks(unet):
        if not isinstance(block, KNOWN_BLOCKS[kind]):
            known = ", ".join(cls.__name__ for cls in KNOWN_BLOCKS[kind])
            raise TypeError(
                f"unet.{name} is a {type(block).__name__}, which the multi-view hooks do not know "
                f"(expected {known}); diffusers {diffusers.__version__} is installed, the hooks are tested "
                f"with diffusers{TESTED_DIFFUSERS}: install a version in that range"
            )


def _blocks(unet: nn.Module):
    """(kind of :data:`KNOWN_BLOCKS`, name, module) of every block and resampler the hooks attach to."""
    for index, down in enumerate(unet.down_blocks):
        yield "down_blocks", f"down_blocks[{index}]", down
        for k, sampler in enumerate(getattr(down, "downsamplers", None) or ()):
            yield "downsamplers", f"down_blocks[{index}].downsamplers[{k}]", sampler
    yield "mid_block", "mid_block", unet.mid_block
    for k, attention in enumerate(getattr(unet.mid_block, "attentions", None) or ()):
        yield "mid_block.attentions", f"mid_block.attentions[{k}]", attention
    for index, up in enumerate(unet.up_blocks):
        yield "up_blocks", f"up_blocks[{index}]", up
        for k, sampler in enumerate(getattr(up, "upsamplers", None) or ()):
            yield "upsamplers", f"up_blocks[{index}].upsamplers[{k}]", sampler
