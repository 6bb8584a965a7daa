"""Tiny SD 2 stand-ins: SD 2's block structure, determinism, folders that load and run offline."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

from backend.models.tiny import (
    tiny_scheduler,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
    write_tiny_models,
)
from backend.validation import InputError

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"depth": 5, "base": 4, "inpaint": 9}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("kind", KINDS)
def test_unet_has_sd2_block_structure(kind):
    unet = tiny_unet(kind)
    assert unet.config.in_channels == KINDS[kind] and unet.config.out_channels == 4
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    # Multi-view attention hooks sit right before these samplers; the innermost down and outermost up level have none.
    assert [b.downsamplers is not None for b in unet.down_blocks] == [True, True, True, False]
    assert [b.upsamplers is not None for b in unet.up_blocks] == [True, True, True, False]
    assert [getattr(b, "has_cross_attention", False) for b in unet.down_blocks] == [True, True, True, False]
    assert [getattr(b, "has_cross_attention", False) for b in unet.up_blocks] == [False, True, True, True]
    assert isinstance(unet.mid_block, UNetMidBlock2DCrossAttn)
    assert tuple(unet.config.block_out_channels) == (32, 32, 64, 64)
    assert unet.config.use_linear_projection and unet.config.cross_attention_dim == 32
    assert all(len(b.resnets) == 1 for b in unet.down_blocks) and all(len(b.resnets) == 2 for b in unet.up_blocks)
    # One transformer per cross-attention resnet: 3 down + mid + 3 levels x 2 up, each with self and cross attention.
    assert len(unet.attn_processors) == 2 * (3 + 1 + 6)


def test_unet_keeps_odd_latent_sizes_through_four_levels():
    unet = tiny_unet("depth")
    with torch.no_grad():
        out = unet(torch.randn(2, 5, 6, 8), 500, encoder_hidden_states=torch.randn(2, 77, 32)).sample
    assert out.shape == (2, 4, 6, 8) and torch.isfinite(out).all()


def test_vae_downscales_by_8_into_4_channels():
    vae = tiny_vae()
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 3, 48, 64) * 2 - 1).latent_dist.mean
        image = vae.decode(latent).sample
    assert latent.shape == (1, 4, 6, 8) and image.shape == (1, 3, 48, 64)


def test_tokenizer_and_text_encoder_fit_together():
    tokenizer, encoder = tiny_tokenizer(), tiny_text_encoder()
    ids = tokenizer(["a red chair", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and tokenizer.model_max_length == 77
    assert int(ids.max()) < encoder.config.vocab_size
    assert ids[0, 0] == 0 and ids[0, 12] == 1  # <|startoftext|>, 11 characters, <|endoftext|>
    with torch.no_grad():
        assert encoder(ids).last_hidden_state.shape == (2, 77, 32)


def test_scheduler_is_sd2_epsilon_ddim():
    config = tiny_scheduler().config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.prediction_type == "epsilon" and config.steps_offset == 1
    assert not config.clip_sample and not config.set_alpha_to_one


def test_same_seed_same_weights_and_callers_random_state_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    for build in (lambda seed: tiny_unet("base", seed), tiny_vae, tiny_text_encoder):
        first, second, other = build(7).state_dict(), build(7).state_dict(), build(8).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(value, second[key]) for key, value in first.items())
        assert not all(torch.equal(value, other[key]) for key, value in first.items())
    assert torch.equal(torch.rand(1), expected_next)


def test_unknown_kind_names_the_field():
    with pytest.raises(InputError) as caught:
        tiny_unet("pano")
    assert caught.value.field == "kind"


def _load(kind, folder):
    if kind == "depth":
        return StableDiffusionDepth2ImgPipeline.from_pretrained(
            folder, depth_estimator=None, feature_extractor=None, local_files_only=True
        )
    cls = StableDiffusionPipeline if kind == "base" else StableDiffusionInpaintPipeline
    return cls.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )


@pytest.mark.parametrize("kind", KINDS)
def test_written_folder_loads_with_its_pipeline_and_runs(folders, kind):
    folder = folders[kind]
    assert folder.name == kind
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = _load(kind, folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == KINDS[kind]
    assert torch.equal(pipe.unet.conv_in.weight, tiny_unet(kind).conv_in.weight)

    generator = torch.Generator().manual_seed(0)
    common = {"num_inference_steps": 2, "output_type": "np", "generator": generator}
    image = torch.rand(1, 3, 48, 64)
    if kind == "depth":
        out = pipe("a room", image=image, depth_map=torch.rand(1, 48, 64), strength=1.0, **common)
    elif kind == "base":
        out = pipe("a room", height=48, width=64, **common)
    else:
        mask = torch.zeros(1, 1, 48, 64)
        mask[..., 16:, :] = 1.0
        out = pipe("a room", image=image, mask_image=mask, height=48, width=64, **common)
    assert out.images.shape == (1, 48, 64, 3)
    assert np.isfinite(out.images).all()


def test_cli_writes_loadable_folders(tmp_path):
    from backend.models.loading import load_components

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "backend", "make-tiny-model", str(tmp_path / "m")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for kind, channels in KINDS.items():
        assert f"{kind}: {tmp_path / 'm' / kind} (UNet in_channels {channels})" in done.stdout
        assert load_components(tmp_path / "m" / kind, kind).unet.config.in_channels == channels


def test_tiny_folders_carry_multiview_weights_that_load_strictly(tmp_path):
    from backend.models.loading import load_components
    from backend.models.mv_unet import MultiViewUNet
    from backend.models.tiny import CAA_WEIGHTS, TASK_OF_KIND, write_tiny_models
    from backend.models.weights import load_added_weights

    written = write_tiny_models(tmp_path)
    for kind, folder in written.items():
        components = load_components(folder, kind)
        model = MultiViewUNet(components.unet, TASK_OF_KIND[kind], with_condition=kind == "depth")
        report = load_added_weights(model, folder / CAA_WEIGHTS)
        assert not report.missing and not report.unexpected
        # Random, not zero: offline runs exercise the blocks.
        assert model.caa_down[0].attention.to_out.weight.abs().max() > 0


def test_release_frees_the_models_at_once():
    """The multi-view UNet reaches itself through its hooks: release must not wait for a garbage collection."""
    import gc
    import weakref

    from backend.engine import ModelConfig, ModelSet

    models = ModelSet(ModelConfig.tiny())
    model = weakref.ref(models.sampler("depth").model)
    gc.disable()
    try:
        models.release()
        assert model() is None and models.loaded() == {}
    finally:
        gc.enable()
