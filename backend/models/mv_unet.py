"""A diffusers ``UNet2DConditionModel`` with MVDiffusion's blocks around its own blocks.

The UNet itself is untouched: the added modules run from forward hooks at the places the
released design uses, so any SD 2 checkpoint diffusers can load works here, and with every
added block at its zero initialisation each view's prediction is the plain UNet's.

Placement (nine CAA blocks):

* each down block: after its last resnet/attention, before its downsampler. The skips its layers
  stored keep the pre-CAA tensors; the downsampler output (post-CAA) is the level's last skip.
  The last down block has no downsampler: its CAA output only continues to the mid block.
* mid block: panoramas after ``resnets[0]`` (before the mid attention), the depth task after the
  whole mid block.
* each up block: before its upsampler; the last up block at its output.

The depth task follows every CAA block with a zero-initialised ResNet, and the interpolation
module adds an image-condition branch (keyframe latents and mask) before each down, mid and up
block (:mod:`condition`).

Condition add, clean and released. The released code adds the condition with an in-place
``hidden_states += ...``. At the start of down block i its hidden state is the tensor already
stored as a skip (conv_in's output for block 0, the previous downsampler's output after that),
so the skips the up blocks read carry the condition too; before the mid block the same happens
to the last down block's last skip when no CAA block ran there (one view). By default the add
is out of place and the skips stay as the down path made them. With ``released`` set the hook
adds in place to the very tensor diffusers passes to the block, which diffusers' UNet forward
has also stored in its skip tuple (``down_block_res_samples = (sample,)`` after conv_in, and
each down block returns its downsampler output both as the hidden state and as its last skip),
so the stored skips change exactly as in the released code. Where nothing else holds the tensor
(up blocks, the mid block after a CAA block) in place and out of place give the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .caa import CAABlock
from .caa_tokens import LevelGeometry, ViewGroups
from .condition import ConditionBranch
from .unet_blocks import check_unet_blocks
from .view_attention import install_view_attention

Task = Literal["panorama", "depth"]


class MultiViewUNet(nn.Module):
    """Runs all views of a batch through the UNet together, exchanging information through CAA.

    Inputs are flattened views: ``sample`` (B * V, C, h, w) with the V views of each sample
    consecutive. ``geometry`` maps a level's latent size (h, w) to its :class:`LevelGeometry`
    (or :class:`~backend.models.caa_tokens.ViewGroups`); without it (or with one view) the CAA
    blocks are skipped and this is the plain UNet.

    ``released``: add the condition in place, as the released code does (module docstring);
    :func:`~backend.models.released.use_released_behaviour` sets it with the rest of the released
    behaviour.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        task: Task,
        mask_invalid: bool = True,
        with_condition: bool = False,
        released: bool = False,
    ):
        super().__init__()
        if task not in ("panorama", "depth"):
            raise ValueError(f"task must be 'panorama' or 'depth', got {task!r}")
        self.unet, self.task = unet, task
        self.released = released
        channels = list(unet.config.block_out_channels)
        encoding_inputs = 2 if task == "panorama" else 1
        with_resnet = task == "depth"

        groups = unet.config.norm_num_groups

        def block(dim: int) -> CAABlock:
            return CAABlock(dim, encoding_inputs, with_resnet, mask_invalid, groups)

        self.caa_down = nn.ModuleList(block(dim) for dim in channels)
        self.caa_mid = block(channels[-1])
        self.caa_up = nn.ModuleList(block(dim) for dim in reversed(channels))
        self.condition = ConditionBranch(unet) if with_condition else None
        self._geometry: Mapping[tuple[int, int], LevelGeometry | ViewGroups] | None = None
        self._condition_features: torch.Tensor | None = None
        self._hooks = self._install_hooks()
        install_view_attention(unet)  # plain attention until a call passes its geometry
        if self.condition is not None:
            self._hooks += self._install_condition_hooks()

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> list:
        check_unet_blocks(self.unet)  # hooks on blocks of an unknown diffusers would fire in the wrong place
        unet, hooks = self.unet, []
        for down, caa in zip(unet.down_blocks, self.caa_down, strict=True):
            if down.downsamplers:
                hooks.append(down.downsamplers[0].register_forward_pre_hook(self._pre_hook(caa)))
            else:
                hooks.append(down.register_forward_hook(self._down_output_hook(caa)))
        if self.task == "panorama" and getattr(unet.mid_block, "attentions", None):
            hooks.append(unet.mid_block.attentions[0].register_forward_pre_hook(self._pre_hook(self.caa_mid)))
        else:
            hooks.append(unet.mid_block.register_forward_hook(self._output_hook(self.caa_mid)))
        for up, caa in zip(unet.up_blocks, self.caa_up, strict=True):
            if up.upsamplers:
                hooks.append(up.upsamplers[0].register_forward_pre_hook(self._pre_hook(caa)))
            else:
                hooks.append(up.register_forward_hook(self._output_hook(caa)))
        return hooks

    def _install_condition_hooks(self) -> list:
        """Add the condition encoders' outputs before every down, mid and up block."""
        unet, branch, hooks = self.unet, self.condition, []
        for block, encoder in zip(unet.down_blocks, branch.down, strict=True):
            hooks.append(block.register_forward_pre_hook(self._condition_kwarg_hook(encoder), with_kwargs=True))
        hooks.append(unet.mid_block.register_forward_pre_hook(self._condition_arg_hook(branch.mid)))
        for block, encoder in zip(unet.up_blocks, branch.up, strict=True):
            hooks.append(block.register_forward_pre_hook(self._condition_kwarg_hook(encoder), with_kwargs=True))
        return hooks

    def _add_condition(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        features = self._condition_features
        if features is None:
            return hidden
        encoded = encoder(features).repeat(hidden.shape[0] // features.shape[0], 1, 1, 1)
        if self.released:
            # The stored skip is this same tensor: adding in place reaches it, as released.
            return hidden.add_(encoded)
        return hidden + encoded

    def _condition_kwarg_hook(self, encoder: nn.Module):
        def hook(module, args, kwargs):
            if args:  # called positionally
                return (self._add_condition(encoder, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=self._add_condition(encoder, kwargs["hidden_states"]))
            return args, kwargs

        return hook

    def _condition_arg_hook(self, encoder: nn.Module):
        def hook(module, args):
            return (self._add_condition(encoder, args[0]),) + tuple(args[1:])

        return hook

    def _run_caa(self, caa: CAABlock, hidden: torch.Tensor) -> torch.Tensor:
        geometry = self._geometry
        if not geometry:
            return hidden
        level = geometry.get(tuple(hidden.shape[-2:]))
        if level is None:
            raise ValueError(f"no CAA geometry for a {tuple(hidden.shape[-2:])} feature map; have {sorted(geometry)}")
        return caa(hidden, level)

    def _pre_hook(self, caa: CAABlock):
        def hook(module, args):
            return (self._run_caa(caa, args[0]),) + tuple(args[1:])

        return hook

    def _output_hook(self, caa: CAABlock):
        def hook(module, args, output):
            return self._run_caa(caa, output)

        return hook

    def _down_output_hook(self, caa: CAABlock):
        def hook(module, args, output):
            hidden, skips = output
            return self._run_caa(caa, hidden), skips

        return hook

    # ------------------------------------------------------------------ running
    @contextmanager
    def views(self, geometry: Mapping[tuple[int, int], LevelGeometry | ViewGroups] | None):
        """Make the UNet's calls inside the block multi-view with this geometry."""
        previous, self._geometry = self._geometry, geometry
        try:
            yield self
        finally:
            self._geometry = previous

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        geometry: Mapping[tuple[int, int], LevelGeometry | ViewGroups] | None = None,
        condition: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Noise prediction for every view; ``geometry`` and ``attention`` None run the plain UNet.

        ``condition`` (V, 5, h, w): keyframe latents and mask for the interpolation module, one per
        view, shared by every guidance half of the batch. ``cross_attention_kwargs`` go to the
        UNet's attention processors, as in diffusers: training-free multi-view self-attention
        (:mod:`~backend.models.view_attention`) takes its geometry there as a call argument.
        """
        if condition is not None and self.condition is None:
            raise ValueError("this model has no condition branch (build it with with_condition=True)")
        features = self.condition.features(condition) if condition is not None else None
        previous, self._condition_features = self._condition_features, features
        try:
            with self.views(geometry):
                return self.unet(sample, timestep, encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                                 return_dict=False)[0]
        finally:
            self._condition_features = previous

    def added_modules(self) -> dict[str, nn.Module]:
        """The trainable additions (everything but the base UNet), by name."""
        modules = {"caa_down": self.caa_down, "caa_mid": self.caa_mid, "caa_up": self.caa_up}
        if self.condition is not None:
            modules["condition"] = self.condition
        return modules

    def added_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value for name, module in self.added_modules().items()
            for key, value in module.state_dict().items()
        }

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def level_sizes(unet: UNet2DConditionModel, latent_height: int, latent_width: int) -> list[tuple[int, int]]:
    """Feature sizes of every level for a latent size (each downsampler halves, rounding up)."""
    sizes, height, width = [], latent_height, latent_width
    for down in unet.down_blocks:
        sizes.append((height, width))
        if down.downsamplers:
            height, width = (height + 1) // 2, (width + 1) // 2
    return sizes
