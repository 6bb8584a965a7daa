"""Released MVDiffusion checkpoints: key map, safe and strict loading, and the released encodings.

The released state dicts come from ``released_state``, written from the suffix tables of
mvdiffusion.md §11 (names and shapes) independently of ``backend.models.released``'s own tables,
so a wrong map shows up as missing or unexpected keys.
"""

import math

import pytest
import released_state
import torch
from released_reference import released_attention, released_pos_embedding
from released_state import reference_frequencies

from backend.models.caa_tokens import LevelGeometry
from backend.models.mv_unet import MultiViewUNet, level_sizes
from backend.models.released import (
    LoadReport,
    ReleasedDepthEncoding,
    ReleasedPanoramaEncoding,
    component_state_dict,
    load_released_checkpoint,
    released_key_map,
    use_released_behaviour,
)
from backend.models.tiny import tiny_text_encoder, tiny_unet, tiny_vae
from backend.validation import InputError

KIND = {"panorama": "base", "depth": "depth"}


# -- released state dicts, from the reference's tables --------------------------------------------------------------
def make_released_state(task: str, seed: int = 1) -> dict[str, torch.Tensor]:
    text_encoder = {k: v.half() for k, v in tiny_text_encoder(seed=4).state_dict().items()}
    return released_state.make_released_state(
        task, tiny_unet(KIND[task], seed=5), tiny_vae(seed=3).state_dict(), text_encoder, seed=seed
    )


@pytest.fixture(scope="module")
def released():
    return {task: make_released_state(task) for task in KIND}


def model_for(task: str, with_condition: bool = False) -> MultiViewUNet:
    return MultiViewUNet(tiny_unet(KIND[task], seed=0), task, with_condition=with_condition)


def refused(model, state, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load_released_checkpoint(model, state, **kwargs)
    assert caught.value.field == "checkpoint"
    return caught.value


# -- loading --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", KIND)
def test_released_state_loads_completely(released, task):
    model = model_for(task)
    report = load_released_checkpoint(model, released[task])
    assert report.complete and report.design == task
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatches == []
    assert sorted(report.loaded) == sorted(model.state_dict())
    assert len(report.skipped["vae"]) == len(tiny_vae().state_dict())
    assert len(report.skipped["text_encoder"]) == len(tiny_text_encoder().state_dict()) + 1
    assert ("condition" in report.skipped) == (task == "depth")
    assert sorted(report.frequencies) == sorted(
        [f"caa_down.{i}" for i in range(4)] + ["caa_mid"] + [f"caa_up.{i}" for i in range(4)]
    )


def test_panorama_values_land_in_place(released):
    state, model = released["panorama"], model_for("panorama")
    load_released_checkpoint(model, state)
    pairs = {
        "cp_blocks_encoder.1.transformer.attn1.to_q.weight": model.caa_down[1].attention.to_q.weight,
        "cp_blocks_encoder.3.transformer.attn1.to_out.bias": model.caa_down[3].attention.to_out.bias,
        "cp_blocks_mid.transformer.norm2.weight": model.caa_mid.attention.norm2.weight,
        "cp_blocks_mid.transformer.ff.net.0.proj.weight": model.caa_mid.attention.ff.proj.weight,
        "cp_blocks_decoder.0.transformer.attn1.to_v.weight": model.caa_up[0].attention.to_v.weight,
        "cp_blocks_decoder.3.transformer.ff.net.2.weight": model.caa_up[3].attention.ff.out.weight,
        "cp_blocks_decoder.2.transformer.norm1.bias": model.caa_up[2].attention.norm1.bias,
        "unet.conv_in.weight": model.unet.conv_in.weight,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
        "unet.up_blocks.3.resnets.1.conv_shortcut.weight": model.unet.up_blocks[3].resnets[1].conv_shortcut.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(tensor, state["mv_base_model." + key]), key


def test_depth_values_land_in_place(released):
    state, model = released["depth"], model_for("depth")
    load_released_checkpoint(model, state)
    pairs = {
        "cp_blocks_encoder.0.attn1.transformer.attn1.to_k.weight": model.caa_down[0].attention.to_k.weight,
        "cp_blocks_encoder.0.resnet.bn1.weight": model.caa_down[0].resnet.norm1.weight,
        "cp_blocks_mid.resnet.conv2.weight": model.caa_mid.resnet.conv2.weight,
        "cp_blocks_mid.attn1.transformer.ff.net.2.bias": model.caa_mid.attention.ff.out.bias,
        "cp_blocks_decoder.1.resnet.bn2.bias": model.caa_up[1].resnet.norm2.bias,
        "cp_blocks_decoder.3.resnet.conv1.weight": model.caa_up[3].resnet.conv1.weight,
        "unet.conv_in.weight": model.unet.conv_in.weight,
        "unet.mid_block.attentions.0.proj_in.weight": model.unet.mid_block.attentions[0].proj_in.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(tensor, state["mv_base_model." + key]), key


def test_key_map_uses_released_names():
    key_map = released_key_map(model_for("depth", with_condition=True))
    expected = {
        "caa_up.2.attention.ff.proj.bias": "cp_blocks_decoder.2.attn1.transformer.ff.net.0.proj.bias",
        "caa_down.1.resnet.norm2.weight": "cp_blocks_encoder.1.resnet.bn2.weight",
        "unet.time_embedding.linear_1.weight": "unet.time_embedding.linear_1.weight",
        "condition.mid.conv1.bias": "condition_downblocks.3.conv1.bias",
    }
    for ours, released in expected.items():
        assert key_map[ours] == "mv_base_model." + released
    assert None not in key_map.values()


def test_condition_branch_loads_with_the_released_mid_quirk(released):
    state, model = released["depth"], model_for("depth", with_condition=True)
    report = load_released_checkpoint(model, state)
    assert report.complete and "condition" not in report.skipped
    assert sorted(report.loaded) == sorted(model.state_dict())
    branch = model.condition
    assert torch.equal(branch.conv_in.weight, state["mv_base_model.condition_conv_in.weight"])
    assert torch.equal(branch.down[1].conv1.weight, state["mv_base_model.condition_downblocks.1.conv1.weight"])
    assert torch.equal(branch.up[2].norm2.bias, state["mv_base_model.condition_upblocks.2.norm2.bias"])
    # The released mid block reuses the last down encoder, so both of ours load from it.
    assert torch.equal(branch.mid.conv2.weight, state["mv_base_model.condition_downblocks.3.conv2.weight"])
    assert torch.equal(branch.down[3].conv2.weight, branch.mid.conv2.weight)

    without = {k: v for k, v in state.items() if not k.startswith("mv_base_model.condition_")}
    err = refused(model_for("depth", with_condition=True), without)
    assert "condition.conv_in.weight" in err.problem


def test_missing_key_is_refused_unless_partial(released):
    state = dict(released["panorama"])
    del state["mv_base_model.cp_blocks_decoder.2.transformer.attn1.to_k.weight"]
    model = model_for("panorama")
    before = model.unet.conv_in.weight.clone()
    err = refused(model, state)
    assert "1 missing" in err.problem and "caa_up.2.attention.to_k.weight" in err.problem
    assert torch.equal(model.unet.conv_in.weight, before)  # a refused load writes nothing

    report = load_released_checkpoint(model, state, allow_partial=True)
    assert not report.complete and report.missing == ["caa_up.2.attention.to_k.weight"]
    assert torch.equal(model.unet.conv_in.weight, state["mv_base_model.unet.conv_in.weight"])


def test_wrong_shape_is_refused_unless_partial(released):
    state = dict(released["depth"])
    key = "mv_base_model.cp_blocks_mid.attn1.transformer.attn1.to_q.weight"
    state[key] = torch.zeros(64, 32)
    err = refused(model_for("depth"), state)
    assert "another shape" in err.problem and key in err.problem
    report = load_released_checkpoint(model_for("depth"), state, allow_partial=True)
    assert report.shape_mismatches == [(key, "caa_mid.attention.to_q.weight", (64, 32), (64, 64))]
    assert report.missing == []


def test_unexpected_key_is_refused_unless_partial(released):
    state = dict(released["panorama"])
    extra = "mv_base_model.cp_blocks_mid.transformer.attn2.to_q.weight"
    state[extra] = torch.zeros(64, 64)
    err = refused(model_for("panorama"), state)
    assert "unexpected" in err.problem and extra in err.problem
    assert load_released_checkpoint(model_for("panorama"), state, allow_partial=True).unexpected == [extra]


def test_frequency_buffer_is_checked(released):
    state = dict(released["panorama"])
    key = "mv_base_model.cp_blocks_encoder.0.pe.freq_bands"
    state[key] = state[key] * 1.01
    assert key in refused(model_for("panorama"), state).problem


def test_other_design_or_unet_kind_is_named(released):
    err = refused(model_for("panorama"), released["depth"])
    assert "depth-design" in err.problem
    state = dict(released["panorama"])
    state["mv_base_model.unet.conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    assert "9 input channels (SD 2 inpainting)" in refused(model_for("panorama"), state).problem


def test_file_without_caa_blocks_loads_only_partially(released):
    unet_only = {k: v for k, v in released["depth"].items() if k.startswith("mv_base_model.unet.")}
    assert "no CAA blocks" in refused(model_for("depth"), unet_only).problem
    report = load_released_checkpoint(model_for("depth"), unet_only, allow_partial=True)
    assert report.design is None and len(report.loaded) == len(unet_only)
    assert all(key.startswith("caa_") for key in report.missing)


def test_lightning_ckpt_file_loads(released, tmp_path):
    path = tmp_path / "pano.ckpt"
    torch.save({"state_dict": released["panorama"], "epoch": 9, "global_step": 12,
                "hyper_parameters": {"config": {"model": {"guidance_scale": 9.0}}}}, path)
    report = load_released_checkpoint(model_for("panorama"), path)
    assert report.complete and isinstance(report, LoadReport)


class RunsCodeWhenUnpickled:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused_without_running_them(released, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": released["panorama"], "callbacks": RunsCodeWhenUnpickled(marker)}, path)
    err = refused(model_for("panorama"), path)
    assert "pickled" in err.problem and not marker.exists()
    assert "does not exist" in refused(model_for("panorama"), tmp_path / "absent.ckpt").problem


def test_vae_and_text_encoder_load_into_their_models(released):
    vae, text_encoder = tiny_vae(seed=0), tiny_text_encoder(seed=0)
    vae.load_state_dict(component_state_dict(released["panorama"], "vae", vae), strict=True)
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_out[0].weight,
                       released["panorama"]["vae.encoder.mid_block.attentions.0.proj_attn.weight"])
    text_encoder.load_state_dict(component_state_dict(released["panorama"], "text_encoder", text_encoder), strict=True)


# -- released encodings ---------------------------------------------------------------------------------------------
def test_panorama_encoding_dim_320_uses_base_2_and_released_layout():
    encoding = ReleasedPanoramaEncoding(320)
    assert encoding.dim == 320 and encoding.freq_bands.shape == (80,)
    assert torch.equal(encoding.freq_bands, 2.0 ** torch.arange(80, dtype=torch.float32))
    dx, dy = 0.375, -0.5
    out = encoding(torch.tensor([[dx, dy], [0.0, 0.0]]))
    assert out.shape == (2, 320)
    for k in (0, 1, 5):  # small frequencies, so float32 sin/cos are accurate to 1e-6
        f = 2.0**k
        assert out[0, k].item() == pytest.approx(math.sin(dx * f), abs=1e-6)
        assert out[0, 80 + k].item() == pytest.approx(math.sin(dy * f), abs=1e-6)
        assert out[0, 160 + k].item() == pytest.approx(math.cos(dx * f), abs=1e-6)
        assert out[0, 240 + k].item() == pytest.approx(math.cos(dy * f), abs=1e-6)
    assert torch.equal(out[1], torch.cat([torch.zeros(160), torch.ones(160)]))  # the query encoding


@pytest.mark.parametrize("dim, base", [(640, 5000 ** (1 / 64)), (1280, 5000 ** (1 / 128))])
def test_panorama_encoding_wide_blocks_use_base_5000(dim, base):
    encoding = ReleasedPanoramaEncoding(dim)
    count = dim // 4
    # The released code raises the float32-rounded base to integer powers.
    base32 = torch.tensor(base, dtype=torch.float32).item()
    expected = torch.tensor([base32**k for k in range(count)], dtype=torch.float64)
    torch.testing.assert_close(encoding.freq_bands.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(encoding.freq_bands, reference_frequencies(count).flatten())
    out = encoding(torch.tensor([0.25, 0.0]))
    assert out[1].item() == pytest.approx(math.sin(0.25 * base), abs=1e-6)
    assert out[count + 1].item() == 0.0 and out[3 * count + 7].item() == 1.0


def test_depth_encoding_pairs_consecutive_scalars():
    encoding = ReleasedDepthEncoding(320)
    assert encoding.freq_bands.shape == (160,)
    assert encoding.freq_bands[1].item() == pytest.approx(5000 ** (1 / 64), rel=1e-6)
    # One view, two pixels of three tokens each: memory order s0..s5, pairs (s0 s1) (s2 s3) (s4 s5).
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    out = encoding(s.view(1, 2, 3, 1))
    assert out.shape == (1, 2, 3, 320)
    f = encoding.freq_bands

    def sines(a, b):
        return torch.cat([torch.sin(s[a] * f), torch.sin(s[b] * f)])

    def cosines(a, b):
        return torch.cat([torch.cos(s[a] * f), torch.cos(s[b] * f)])

    expected = torch.stack([sines(0, 1), cosines(0, 1), sines(2, 3), cosines(2, 3), sines(4, 5), cosines(4, 5)])
    assert torch.equal(out.view(6, 320), expected)  # pixel 0's last token pairs with pixel 1's first
    assert out[0, 0, 0, 3].item() == pytest.approx(math.sin(0.1 * (5000 ** (1 / 64)) ** 3), abs=1e-5)
    # Views are separate sequences: the same pixels again as a second view encode the same way.
    two_views = encoding(torch.stack([s.view(2, 3, 1), s.view(2, 3, 1)]))
    assert torch.equal(two_views[1], out[0])


def test_depth_query_encoding_alternates_per_pixel():
    encoding = ReleasedDepthEncoding(64)
    queries = encoding(torch.zeros(6, 1, 1))[:, 0]
    for pixel in range(6):
        assert torch.equal(queries[pixel], torch.full((64,), float(pixel % 2))), pixel
    assert torch.equal(encoding(torch.zeros(1)), torch.zeros(64))  # a lone query: the even-pixel vector


def released_block(block, hidden, geometry, sources, samples: int = 1):
    """The released CAA for one sample, view by view: keys (P, T, C) slot-major, query encoding of (P, 1, E) zeros."""
    views, dim, height, width = hidden.shape
    pixels = height * width
    frequencies = block.encoding.freq_bands
    inputs = geometry.encoding_input.shape[-1]
    out = hidden.clone()
    for view in range(views):
        reads = [
            torch.nn.functional.grid_sample(hidden[source][None], geometry.grid[view, slot][None], align_corners=False)
            for slot, source in enumerate(sources[view])
        ]
        keys = torch.cat([r[0].permute(1, 2, 0) for r in reads], dim=1)  # (P, T, C), T = slots x samples
        assert keys.shape[1] == len(sources[view]) * samples
        x = hidden[view].reshape(dim, pixels).T[:, None]  # (P, 1, C)
        key_encoding = released_pos_embedding(geometry.encoding_input[view], frequencies)
        query_encoding = released_pos_embedding(torch.zeros(pixels, 1, inputs).double(), frequencies)
        x = released_attention(block, x, keys, geometry.valid[view], key_encoding, query_encoding)
        out[view] = x[:, 0].T.reshape(dim, height, width)
    return out


@pytest.mark.parametrize("design", ["depth", "panorama"])
@pytest.mark.parametrize("dim", [64, 320, 1280])
def test_fast_and_literal_blocks_match_the_released_block(design, dim):
    """The released head split (dim // 32 heads of 32) at SD 2's widths, zero-vector keys, released encodings.

    Depth: an odd token count makes the pairs cross pixels; odd pixels' all-one query encodings
    vanish in norm1. The literal form that ``bench caa`` times against must be this block too.
    """
    from backend.models.caa import CorrespondenceAttention
    from backend.models.literal_caa import literal_attention

    torch.manual_seed(0)
    views, height, width = 3, 3, 4
    slots, samples, inputs = (3, 1, 1) if design == "depth" else (2, 9, 2)
    pixels, tokens = height * width, slots * samples
    sources = [[1, 2, 0], [0, 2, 1], [0, 1, 2]] if design == "depth" else [[2, 1], [0, 2], [1, 0]]
    geometry = LevelGeometry(
        height, width, torch.tensor(sources),
        torch.rand(views, slots, pixels, samples, 2) * 2.4 - 1.2,
        torch.rand(views, pixels, tokens) < 0.7,
        torch.rand(views, pixels, tokens, inputs) * 2 - (1.0 if design == "panorama" else 0.0),
    ).to("cpu", torch.float64)
    block = CorrespondenceAttention(dim, inputs).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * (0.3 * math.sqrt(64 / param.shape[1]) if param.dim() == 2 else 0.3))
    encoding = ReleasedDepthEncoding(dim) if design == "depth" else ReleasedPanoramaEncoding(dim)
    block.encoding, block.mask_invalid = encoding, False
    assert block.heads == dim // 32
    hidden = torch.randn(views, dim, height, width, dtype=torch.float64)
    with torch.no_grad():
        expected = released_block(block, hidden, geometry, sources, samples)
        torch.testing.assert_close(block(hidden, geometry), expected)
        torch.testing.assert_close(literal_attention(block, hidden, geometry, per_sample=design == "depth"), expected)


def test_released_encodings_keep_float32_frequencies_through_casts():
    encoding = ReleasedPanoramaEncoding(1280).half()
    assert encoding.freq_bands.dtype == torch.float32
    out = encoding(torch.tensor([0.5, -0.25], dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# -- released behaviour ---------------------------------------------------------------------------------------------
def random_geometry(unet, views: int, tokens: int, inputs: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for height, width in level_sizes(unet, 8, 8):
        pixels = height * width
        out[(height, width)] = LevelGeometry(
            height, width,
            torch.tensor([[1], [0]]),
            torch.rand(views, 1, pixels, tokens, 2, generator=generator) * 2.4 - 1.2,
            torch.rand(views, pixels, tokens, generator=generator) < 0.7,
            torch.rand(views, pixels, tokens, inputs, generator=generator) - 0.5,
        )
    return out


@pytest.mark.parametrize("task", KIND)
def test_released_behaviour_runs_the_loaded_weights(released, task):
    model = model_for(task)
    report = load_released_checkpoint(model, released[task])
    use_released_behaviour(model, report)
    blocks = [*model.caa_down, model.caa_mid, *model.caa_up]
    kind = ReleasedPanoramaEncoding if task == "panorama" else ReleasedDepthEncoding
    assert all(isinstance(b.attention.encoding, kind) and not b.attention.mask_invalid for b in blocks)
    assert torch.equal(model.caa_up[1].attention.encoding.freq_bands, report.frequencies["caa_up.1"])
    assert not any("freq_bands" in key for key in model.state_dict())

    tokens, inputs = (9, 2) if task == "panorama" else (2, 1)
    sample = torch.randn(2, model.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    calls = []
    for block in blocks:
        block.register_forward_hook(lambda module, args, output: calls.append(torch.isfinite(output).all()))
    with torch.no_grad():
        out = model(sample, 10, text, random_geometry(model.unet, 2, tokens, inputs))
    assert len(calls) == 9 and all(calls) and torch.isfinite(out).all()
