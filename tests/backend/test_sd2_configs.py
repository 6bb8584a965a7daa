"""SD 2's real architectures written in code: sizes and the random-weight rules.

Everything here stays on the meta device or on small modules; the real-size folders, loading and
pipeline steps are in test_real_size.py.
"""

import math

import pytest
import torch
from torch import nn

from backend.models.sd2_configs import (
    SD2_CHANNELS,
    empty_text_encoder,
    empty_unet,
    empty_vae,
    materialise,
    random_state_dict,
    unet_config,
)
from backend.models.tiny import tiny_unet
from backend.validation import InputError


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind, in_channels", [("base", 4), ("depth", 5), ("inpaint", 9)])
def test_unets_have_sd2_sizes(kind, in_channels):
    unet = empty_unet(kind)
    assert unet.conv_in.weight.is_meta and unet.config.in_channels == in_channels
    assert tuple(unet.config.block_out_channels) == SD2_CHANNELS
    # SD 2 base's UNet has 865,910,724 parameters; each further input channel adds one 3x3 kernel per output.
    assert parameters(unet) == 865_910_724 + (in_channels - 4) * 320 * 9
    heads = [down.attentions[0].transformer_blocks[0].attn1.heads for down in unet.down_blocks[:3]]
    assert heads == [5, 10, 20, 20][:3]  # 64-channel heads
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024


def test_vae_and_text_encoder_have_sd2_sizes():
    vae, text_encoder = empty_vae(), empty_text_encoder()
    assert parameters(vae) == 83_653_863 and vae.config.scaling_factor == 0.18215
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    assert parameters(text_encoder) == 340_387_840
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 23, 16)
    assert (config.intermediate_size, config.hidden_act, config.max_position_embeddings) == (4096, "gelu", 77)


def test_unknown_kind_names_the_field():
    with pytest.raises(InputError, match="kind"):
        unet_config("sdxl")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.linear = nn.Linear(16, 32)
        self.conv = nn.Conv2d(32, 8, 3)
        self.norm = nn.GroupNorm(4, 8)
        self.layer_norm = nn.LayerNorm(16)


def test_random_weights_follow_pytorchs_default_scale_per_layer():
    with torch.device("meta"):
        model = Small()
    state = random_state_dict(model, seed=3, dtype=torch.float16)
    assert sorted(state) == sorted(Small().state_dict())
    assert all(value.dtype == torch.float16 and not value.is_meta for value in state.values())
    for name, fan_in in (("linear", 16), ("conv", 32 * 9)):
        for part in ("weight", "bias"):
            values = state[f"{name}.{part}"].float()
            assert values.abs().max() <= 1 / math.sqrt(fan_in) and values.std() > 0.4 / math.sqrt(fan_in)
    assert state["embed.weight"].float().std().item() == pytest.approx(0.02, rel=0.1)
    for norm in ("norm", "layer_norm"):
        assert torch.equal(state[f"{norm}.weight"], torch.ones_like(state[f"{norm}.weight"]))
        assert torch.equal(state[f"{norm}.bias"], torch.zeros_like(state[f"{norm}.bias"]))
    again, other = random_state_dict(model, seed=3, dtype=torch.float16), random_state_dict(model, seed=4)
    assert all(torch.equal(state[key], again[key]) for key in state)
    assert not torch.equal(state["linear.weight"].float(), other["linear.weight"])


def test_a_materialised_unet_runs_finite_and_refuses_models_with_buffers_it_cannot_draw():
    with torch.device("meta"):
        unet = tiny_unet("depth")
    unet = materialise(unet, seed=1)
    assert not unet.conv_in.weight.is_meta
    with torch.no_grad():
        out = unet(torch.randn(2, 5, 16, 16), 500, torch.randn(2, 77, 32)).sample
    assert torch.isfinite(out).all() and out.std() > 0
    with pytest.raises(ValueError, match="position_ids"):
        materialise(empty_text_encoder())
