"""load_controlnet_base: SD 1.5 / SDXL folders, single files of fine-tuned models, ControlNets, and the errors."""

import pytest
import safetensors.torch
import torch
from ldm_layout import controlnet_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

from backend.models import catalog
from backend.models.base_loading import load_controlnet_base
from backend.models.tiny import write_tiny_models
from backend.models.tiny_bases import tiny_controlnet_base, write_tiny_controlnet_base
from backend.validation import InputError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {shape: write_tiny_controlnet_base(shape, root) for shape in ("sd15", "sdxl")}


def same_weights(expected: torch.nn.Module, loaded: torch.nn.Module) -> bool:
    want, have = expected.state_dict(), loaded.state_dict()
    return want.keys() == have.keys() and all(torch.equal(value, have[key]) for key, value in want.items())


@pytest.mark.parametrize(("shape", "kind"), [("sd15", "sd15_controlnet"), ("sdxl", "sdxl_controlnet")])
def test_folders_load_every_component_with_the_controlnet(folders, shape, kind):
    model, controlnet = folders[shape]
    loaded = load_controlnet_base(kind, model, controlnet, offline=True)
    tiny = tiny_controlnet_base(shape).adapter
    assert loaded.adapter.kind == kind and loaded.adapter.task == "depth"
    assert same_weights(tiny.unet, loaded.adapter.unet) and same_weights(tiny.controlnet, loaded.adapter.controlnet)
    assert len(loaded.adapter.text_encoders) == (2 if shape == "sdxl" else 1)
    for want, have in zip(tiny.text_encoders, loaded.adapter.text_encoders, strict=True):
        assert same_weights(want, have)
    without = load_controlnet_base(kind, model, None, offline=True)
    assert without.adapter.controlnet is None and without.adapter.task == "panorama"


def test_the_other_family_is_named_with_the_kind_to_use(folders):
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", folders["sdxl"][0], None, offline=True)
    assert err.value.field == "source" and "sdxl_controlnet" in err.value.problem


def test_a_controlnet_for_another_family_is_refused(folders):
    with pytest.raises(InputError) as err:
        load_controlnet_base("sdxl_controlnet", folders["sdxl"][0], folders["sd15"][1], offline=True)
    assert err.value.field == "controlnet" and "SD 1.5" in err.value.problem


def test_a_depth_channel_model_is_not_a_controlnet_base(tmp_path):
    depth = write_tiny_models(tmp_path)["depth"]
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", depth, None, offline=True)
    assert err.value.field == "source" and "5 input channels" in err.value.problem


def test_missing_hub_model_offline_names_source_and_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError) as err:
        load_controlnet_base("sdxl_controlnet", catalog.default_family_model("sdxl_controlnet"), None, offline=True)
    assert err.value.field == "source" and "hf download" in err.value.problem


def sd15_single_file(adapter, vae) -> dict:
    """A tiny SD 1.5 model in the original single-file layout (CLIP under cond_stage_model.transformer)."""
    text = {"cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): value
            for key, value in adapter.text_encoders[0].state_dict().items() if not key.endswith("position_ids")}
    state = {**unet_to_ldm(adapter.unet.state_dict()), **vae_to_ldm(vae.state_dict()), **text}
    return {key: value.contiguous() for key, value in state.items()}


def test_a_fine_tuned_single_file_loads_with_the_family_config(folders, tmp_path):
    tuned = tiny_controlnet_base("sd15", seed=7)  # other weights than the config folder's
    path = tmp_path / "my-finetune.safetensors"
    safetensors.torch.save_file(sd15_single_file(tuned.adapter, tuned.vae), path)
    model, controlnet = folders["sd15"]
    loaded = load_controlnet_base("sd15_controlnet", path, controlnet, config=model, offline=True)
    assert same_weights(tuned.adapter.unet, loaded.adapter.unet) and same_weights(tuned.vae, loaded.vae)
    ids = loaded.adapter.tokenizers[0]("a red chair", return_tensors="pt").input_ids
    with torch.no_grad():
        want = tuned.adapter.text_encoders[0](ids).last_hidden_state
        assert torch.equal(loaded.adapter.text_encoders[0](ids).last_hidden_state, want)


def test_single_file_offline_without_config_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    tiny = tiny_controlnet_base("sd15")
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd15_single_file(tiny.adapter, tiny.vae), path)
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", path, None, offline=True)
    assert err.value.field == "config" and "config=" in err.value.problem


def test_a_file_that_is_no_controlnet_is_named_as_the_controlnet(folders, tmp_path):
    path = tmp_path / "not-a-controlnet.safetensors"
    safetensors.torch.save_file({"some.weight": torch.zeros(2)}, path)
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", folders["sd15"][0], path, controlnet_config=folders["sd15"][1],
                             offline=True)
    assert err.value.field == "controlnet"


def test_sdxl_in_float16_keeps_its_vae_in_float32_and_decodes_half_latents(folders):
    from backend.pipelines.sampling import MultiViewSampler

    loaded = load_controlnet_base("sdxl_controlnet", folders["sdxl"][0], None, dtype=torch.float16, offline=True)
    assert loaded.adapter.unet.dtype == torch.float16 and loaded.vae.dtype == torch.float32
    sampler = MultiViewSampler.from_adapter(loaded.adapter, loaded.vae, loaded.scheduler)
    images = sampler.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert images.shape == (1, 64, 64, 3) and images.dtype == "float32"


def test_fp16_only_folders_load_their_fp16_files(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny = tiny_controlnet_base("sd15")
    adapter = tiny.adapter
    pipe = StableDiffusionPipeline(vae=tiny.vae, unet=adapter.unet, text_encoder=adapter.text_encoders[0],
                                   tokenizer=adapter.tokenizers[0], scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "model", variant="fp16")
    adapter.controlnet.save_pretrained(tmp_path / "controlnet", variant="fp16")
    assert not (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_controlnet_base("sd15_controlnet", tmp_path / "model", tmp_path / "controlnet", offline=True)
    assert same_weights(adapter.unet, loaded.adapter.unet) and same_weights(adapter.controlnet,
                                                                           loaded.adapter.controlnet)


def test_offline_hint_names_the_base_kind_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = catalog.default_family_model("sd15_controlnet")
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", repo, None, offline=True)
    assert "models download sd15_controlnet" in err.value.problem and f"hf download {repo}" in err.value.problem


def test_a_single_file_controlnet_loads_with_its_config(folders, tmp_path):
    tuned = tiny_controlnet_base("sd15", seed=5).adapter.controlnet
    path = tmp_path / "my-depth-controlnet.safetensors"
    state = controlnet_to_ldm(tuned.state_dict())
    safetensors.torch.save_file(state, path)
    model, controlnet = folders["sd15"]
    loaded = load_controlnet_base("sd15_controlnet", model, path, controlnet_config=controlnet, offline=True)
    assert same_weights(tuned, loaded.adapter.controlnet)
    del state["control_model.zero_convs.0.0.weight"]
    safetensors.torch.save_file(state, path)
    with pytest.raises(InputError) as err:
        load_controlnet_base("sd15_controlnet", model, path, controlnet_config=controlnet, offline=True)
    assert err.value.field == "controlnet"


def sdxl_single_file(adapter, vae) -> dict:
    """A tiny SDXL model in the original layout: CLIP under conditioner.embedders.0, OpenCLIP under .1."""
    first, second = adapter.text_encoders
    clip = {"conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model."): value
            for key, value in first.state_dict().items() if not key.endswith("position_ids")}
    open_clip = {key.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): value
                 for key, value in open_clip_to_ldm(second.state_dict()).items()}
    open_clip["conditioner.embedders.1.model.text_projection"] = second.text_projection.weight.T
    unet = unet_to_ldm(adapter.unet.state_dict(), attention_up_blocks=(0, 1))
    state = {**unet, **vae_to_ldm(vae.state_dict()), **clip, **open_clip}
    return {key: value.contiguous() for key, value in state.items()}


def test_a_fine_tuned_sdxl_single_file_loads_both_text_encoders(folders, tmp_path):
    tuned = tiny_controlnet_base("sdxl", seed=5, with_controlnet=False)
    path = tmp_path / "my-sdxl.safetensors"
    state = sdxl_single_file(tuned.adapter, tuned.vae)
    safetensors.torch.save_file(state, path)
    loaded = load_controlnet_base("sdxl_controlnet", path, None, config=folders["sdxl"][0], offline=True)
    assert same_weights(tuned.adapter.unet, loaded.adapter.unet) and same_weights(tuned.vae, loaded.vae)
    for want, have in zip(tuned.adapter.text_encoders, loaded.adapter.text_encoders, strict=True):
        assert same_weights(want, have)
    del state["conditioner.embedders.1.model.token_embedding.weight"]
    safetensors.torch.save_file(state, path)
    with pytest.raises(InputError) as err:
        load_controlnet_base("sdxl_controlnet", path, None, config=folders["sdxl"][0], offline=True)
    assert err.value.field == "source" and "text_encoder_2" in err.value.problem
