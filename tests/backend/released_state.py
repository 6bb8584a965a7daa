"""Released MVDiffusion state dicts at any UNet widths, written from mvdiffusion.md §11 (names and shapes).

Independent of ``backend.models.released``'s own tables, so a wrong key map shows up as missing or
unexpected keys. The tiny checkpoint tests and the SD 2-width smoke test build their files here.
"""

from collections.abc import Mapping

import torch

from backend.models.sd2_configs import UniformDraws


def reference_frequencies(bands: int) -> torch.Tensor:
    """The released ``pe.freq_bands`` buffer, shape (1, 1, N)."""
    base = 2 if bands <= 80 else 5000 ** (1 / (bands / 2.5))
    return base ** torch.linspace(0, bands - 1, bands)[None, None]


def attention_suffixes(dim: int, task: str) -> dict[str, tuple[int, ...]]:
    """§11 'Pano CAA suffixes'; the depth design nests them under ``attn1.``."""
    table = {
        "transformer.attn1.to_q.weight": (dim, dim),
        "transformer.attn1.to_k.weight": (dim, dim),
        "transformer.attn1.to_v.weight": (dim, dim),
        "transformer.attn1.to_out.weight": (dim, dim),
        "transformer.attn1.to_out.bias": (dim,),
        "transformer.ff.net.0.proj.weight": (8 * dim, dim),
        "transformer.ff.net.0.proj.bias": (8 * dim,),
        "transformer.ff.net.2.weight": (dim, 4 * dim),
        "transformer.ff.net.2.bias": (dim,),
        "transformer.norm1.weight": (dim,),
        "transformer.norm1.bias": (dim,),
        "transformer.norm2.weight": (dim,),
        "transformer.norm2.bias": (dim,),
    }
    nest = "" if task == "panorama" else "attn1."
    return {nest + suffix: shape for suffix, shape in table.items()}


def resnet_suffixes(dim: int) -> dict[str, tuple[int, ...]]:
    """§11 'Depth ResNet': conv1/conv2 3x3 without bias, bn1/bn2 GroupNorms."""
    return {
        "resnet.conv1.weight": (dim, dim, 3, 3),
        "resnet.bn1.weight": (dim,),
        "resnet.bn1.bias": (dim,),
        "resnet.conv2.weight": (dim, dim, 3, 3),
        "resnet.bn2.weight": (dim,),
        "resnet.bn2.bias": (dim,),
    }


def released_blocks(channels: tuple[int, ...]) -> list[tuple[str, int]]:
    """§3: encoder blocks at each down level, the mid block, decoder blocks in up-block order."""
    blocks = [(f"mv_base_model.cp_blocks_encoder.{i}.", c) for i, c in enumerate(channels)]
    blocks.append(("mv_base_model.cp_blocks_mid.", channels[-1]))
    blocks += [(f"mv_base_model.cp_blocks_decoder.{i}.", c) for i, c in enumerate(reversed(channels))]
    return blocks


def condition_shapes(channels: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """§8: a 5 -> width 3x3 lift, then per injection point GN, 3x3 conv, GN, 1x1 conv, all with biases.

    Down encoders end at each down block's input width; the released up encoders are hard-coded
    to SD 2's (1280, 1280, 1280, 640), i.e. (c3, c3, c2, c1) in block widths.
    """
    width = channels[0]
    shapes = {"condition_conv_in.weight": (width, 5, 3, 3), "condition_conv_in.bias": (width,)}
    down = (width, channels[0], channels[1], channels[2])  # down_blocks[i].resnets[0].in_channels
    up = (channels[3], channels[3], channels[2], channels[1])
    for part, outs in (("downblocks", down), ("upblocks", up)):
        for i, out in enumerate(outs):
            prefix = f"condition_{part}.{i}."
            shapes.update({
                prefix + "norm1.weight": (width,), prefix + "norm1.bias": (width,),
                prefix + "conv1.weight": (out, width, 3, 3), prefix + "conv1.bias": (out,),
                prefix + "norm2.weight": (out,), prefix + "norm2.bias": (out,),
                prefix + "conv2.weight": (out, out, 1, 1), prefix + "conv2.bias": (out,),
            })
    return shapes


def old_vae_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers 0.16 named the VAE mid-block attention query/key/value/proj_attn (issue #16)."""
    import re

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        match = re.match(r"^(.*mid_block\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(.*)$", key)
        out[f"{match[1]}.{old[match[2]]}.{match[3]}" if match else key] = value
    return out


def make_released_state(
    task: str,
    unet,
    vae_state: Mapping[str, torch.Tensor],
    text_encoder_state: Mapping[str, torch.Tensor],
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A released checkpoint's ``state_dict`` for ``task`` around ``unet`` (its keys, shapes and widths).

    ``unet`` may live on the meta device: only its state dict's names and shapes are read. The UNet
    and the added blocks get random ``dtype`` values, uniform in [-1, 1), every tensor its own
    (:class:`~backend.models.sd2_configs.UniformDraws`: fast enough for SD 2's 1.2 G values);
    ``vae_state`` and ``text_encoder_state`` (the frozen SD 2 parts the release also
    saved) are stored as given, the VAE under diffusers 0.16's names, the text encoder with the
    ``position_ids`` buffer transformers 4.28 saved.
    """
    draws = UniformDraws(seed, dtype)

    def rand(shape):
        return draws.uniform(tuple(shape), 1.0)

    channels = tuple(unet.config.block_out_channels)
    state = {f"mv_base_model.unet.{k}": rand(v.shape) for k, v in unet.state_dict().items()}
    nest = "" if task == "panorama" else "attn1."
    for prefix, dim in released_blocks(channels):
        for suffix, shape in attention_suffixes(dim, task).items():
            state[prefix + suffix] = rand(shape)
        state[prefix + nest + "pe.freq_bands"] = reference_frequencies(dim // 4 if task == "panorama" else dim // 2)
        if task == "depth":
            for suffix, shape in resnet_suffixes(dim).items():
                state[prefix + suffix] = rand(shape)
    state.update({f"vae.{k}": v for k, v in old_vae_names(vae_state).items()})
    state.update({f"text_encoder.text_model.{k}": v for k, v in text_encoder_state.items()})
    state["text_encoder.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if task == "depth":
        for suffix, shape in condition_shapes(channels).items():
            state["mv_base_model." + suffix] = rand(shape)
    return state
