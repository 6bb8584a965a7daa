"""The interpolation module's image-condition branch.

In-between frames are generated conditioned on the two keyframes around them. The condition is,
per view at latent resolution, the keyframe's VAE latent (zeros for in-between frames) and a
keyframe mask: 5 channels. A 3x3 convolution lifts it to the first level's width; one small
encoder per injection point (GroupNorm, SiLU, strided 3x3 convolution, GroupNorm, SiLU,
zero-initialised 1x1 convolution) brings it to that point's resolution and width, and its output
is added to the UNet's hidden state before each down block, the mid block and each up block.
The last 1x1 convolutions start at zero, so a new branch changes nothing.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

CONDITION_CHANNELS = 5  # 4 latent channels of the keyframe + 1 keyframe mask


class ImageEncodingBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))


class ConditionBranch(nn.Module):
    """Encoders for every injection point of a diffusers UNet (before down, mid and up blocks)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        width = unet.config.block_out_channels[0]
        groups = unet.config.norm_num_groups
        self.conv_in = nn.Conv2d(CONDITION_CHANNELS, width, 3, padding=1)
        strides, stride = [], 1
        for down in unet.down_blocks:
            strides.append(stride)
            stride *= 2 if down.downsamplers else 1
        self.down = nn.ModuleList(
            ImageEncodingBlock(width, block.resnets[0].in_channels, s, groups)
            for block, s in zip(unet.down_blocks, strides, strict=True)
        )
        self.mid = ImageEncodingBlock(width, unet.mid_block.resnets[0].in_channels, strides[-1], groups)
        up_strides = list(reversed(strides))
        reversed_widths = list(reversed(unet.config.block_out_channels))
        # An up block's input is the previous up block's output (the mid block's for the first).
        up_inputs = [reversed_widths[0]] + reversed_widths[:-1]
        self.up = nn.ModuleList(
            ImageEncodingBlock(width, channels, s, groups) for channels, s in zip(up_inputs, up_strides, strict=True)
        )

    def features(self, condition: torch.Tensor) -> torch.Tensor:
        """The shared 3x3 lift of the 5-channel condition; each encoder reads it."""
        return self.conv_in(condition)
