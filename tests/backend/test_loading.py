"""load_components: diffusers folders, hub ids offline, single LDM checkpoint files, and the errors users see."""

import socket

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler
from ldm_layout import open_clip_to_ldm, unet_to_ldm, vae_to_ldm

from backend.models.loading import HUB_IDS, hub_offline, load_components
from backend.models.tiny import tiny_text_encoder, tiny_unet, tiny_vae, write_tiny_models
from backend.validation import InputError

KINDS = {"depth": 5, "base": 4, "inpaint": 9}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


def error_for(*args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load_components(*args, **kwargs)
    return caught.value


# -- diffusers folders ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_folder_loads_every_component(folders, kind):
    parts = load_components(folders[kind], kind)
    assert parts.kind == kind and parts.unet.config.in_channels == KINDS[kind]
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.scheduler.config.prediction_type == "epsilon" and parts.scheduler.config.steps_offset == 1
    assert parts.vae.config.scaling_factor == pytest.approx(0.18215)
    assert parts.tokenizer("a chair").input_ids[0] == 0
    assert torch.equal(parts.unet.conv_in.weight, tiny_unet(kind, seed=0).conv_in.weight)
    assert not parts.unet.training and not parts.text_encoder.training


def test_dtype_applies_to_all_networks(folders):
    parts = load_components(folders["base"], "base", dtype=torch.bfloat16)
    assert {parts.unet.dtype, parts.vae.dtype, parts.text_encoder.dtype} == {torch.bfloat16}


def test_scheduler_of_another_class_becomes_ddim(folders, tmp_path):
    import shutil

    folder = tmp_path / "pndm"
    shutil.copytree(folders["base"], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    text = config.read_text().replace('"DDIMScheduler"', '"PNDMScheduler"')
    config.write_text(text.replace('"clip_sample"', '"skip_prk_steps": true, "clip_sample"'))
    scheduler = load_components(folder, "base").scheduler
    assert type(scheduler) is DDIMScheduler and scheduler.config.beta_end == 0.012


@pytest.mark.parametrize(
    ("have", "want", "words"),
    [
        ("base", "depth", ["SD 2 base", "the depth task needs SD 2 depth"]),
        ("depth", "base", ["SD 2 depth", "needs SD 2 base"]),
        ("base", "inpaint", ["SD 2 base", "needs SD 2 inpainting"]),
    ],
)
def test_wrong_model_for_the_task_names_source(folders, have, want, words):
    err = error_for(folders[have], want)
    assert err.field == "source"
    for word in words:
        assert word in err.problem


def test_unknown_kind_names_kind(folders):
    assert error_for(folders["depth"], "panorama").field == "kind"


@pytest.mark.parametrize("source", ["/no/such/folder", "./missing.safetensors", "missing.ckpt", "justaword"])
def test_missing_path_names_source(source):
    err = error_for(source, "depth")
    assert err.field == "source" and "does not exist" in err.problem


def test_folder_without_diffusers_layout_names_source(tmp_path):
    err = error_for(tmp_path, "depth")
    assert err.field == "source" and "unet/config.json" in err.problem


def test_other_file_types_are_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert error_for(path, "depth").field == "source"


# -- hub ids ----------------------------------------------------------------------------------------------------------


def test_offline_follows_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub_offline()


@pytest.mark.parametrize("explicit", [None, True])
def test_hub_id_offline_fails_fast_naming_source(monkeypatch, explicit):
    if explicit:
        monkeypatch.delenv("HF_HUB_OFFLINE")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connections = []

    def refuse(address, *args, **kwargs):
        connections.append(address)
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))
    err = error_for("nobody-here/no-such-sd2-model", "depth", offline=explicit)
    assert connections == []  # offline means no network at all, not a slow timeout
    assert err.field == "source"
    assert "Hugging Face cache" in err.problem and "huggingface-cli" not in err.problem
    assert "python -m backend models download nobody-here/no-such-sd2-model" in err.problem
    assert "hf download nobody-here/no-such-sd2-model" in err.problem and "Allow Online Access" in err.problem


# -- single checkpoint files (original LDM layout) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def depth_checkpoint():
    """Networks of the depth folder (seed 0) and their weights as one SD 2 style state dict."""
    nets = {"unet": tiny_unet("depth", seed=0), "vae": tiny_vae(seed=1), "text_encoder": tiny_text_encoder(seed=2)}
    state = {
        **unet_to_ldm(nets["unet"].state_dict()),
        **vae_to_ldm(nets["vae"].state_dict()),
        **open_clip_to_ldm(nets["text_encoder"].state_dict()),
    }
    return nets, {key: value.contiguous() for key, value in state.items()}


def assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module) -> None:
    want, have = expected.state_dict(), loaded.state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(value, have[key]) for key, value in want.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_offline_with_local_config(folders, depth_checkpoint, tmp_path, suffix):
    nets, state = depth_checkpoint
    path = tmp_path / f"sd2-depth{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 10}, path)
    parts = load_components(path, "depth", config=folders["depth"], offline=True)
    for name, net in nets.items():
        assert_same_weights(net, getattr(parts, name))
    assert isinstance(parts.scheduler, DDIMScheduler) and parts.unet.config.in_channels == 5
    ids = parts.tokenizer("a red chair", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(parts.text_encoder(ids).last_hidden_state, nets["text_encoder"](ids).last_hidden_state)


def test_single_file_checks_kind_and_config(folders, depth_checkpoint, tmp_path):
    path = tmp_path / "sd2-depth.safetensors"
    safetensors.torch.save_file(depth_checkpoint[1], path)
    wrong_kind = error_for(path, "base", config=folders["base"])
    assert wrong_kind.field == "source" and "SD 2 depth" in wrong_kind.problem
    wrong_config = error_for(path, "depth", config=folders["base"])
    assert wrong_config.field == "config" and "in_channels 4" in wrong_config.problem
    assert error_for(path, "depth", config=tmp_path / "nowhere").field == "config"


def test_single_file_offline_without_config_says_what_to_pass(depth_checkpoint, tmp_path):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(HUB_IDS["depth"], "unet/config.json"), str):
        pytest.skip("the SD 2 depth configs are in this machine's Hugging Face cache")
    path = tmp_path / "sd2-depth.safetensors"
    safetensors.torch.save_file(depth_checkpoint[1], path)
    err = error_for(path, "depth", offline=True)
    assert err.field == "config" and "config=" in err.problem and HUB_IDS["depth"] in err.problem


class RunsCodeWhenUnpickled:
    """An object whose unpickling would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_ckpt_with_arbitrary_objects_is_refused_without_running_them(depth_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": depth_checkpoint[1], "payload": RunsCodeWhenUnpickled(marker)}, path)
    err = error_for(path, "depth")
    assert err.field == "source" and "pickled" in err.problem
    assert not marker.exists()


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"mv_base_model.unet.conv_in.weight": torch.zeros(1)}, "MVDiffusion checkpoint"),
        ({"conv_in.weight": torch.zeros(1)}, "original layout"),
    ],
)
def test_single_file_that_is_not_sd2_names_source(tmp_path, state, words):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(state, path)
    err = error_for(path, "depth")
    assert err.field == "source" and words in err.problem


def test_unreadable_checkpoint_names_source(tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(b"<html>not found</html>")
    err = error_for(path, "depth")
    assert err.field == "source" and "cannot be read" in err.problem
