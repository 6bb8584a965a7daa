"""Our own added weights as safetensors: round trip, header checks, strictness."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend.models.mv_unet import MultiViewUNet
from backend.models.tiny import tiny_unet
from backend.models.weights import FORMAT_VERSION, load_added_weights, save_added_weights
from backend.validation import InputError

KIND = {"panorama": "base", "depth": "depth"}


def model_for(task: str, randomise: int | None = None, with_condition: bool = False) -> MultiViewUNet:
    model = MultiViewUNet(tiny_unet(KIND[task], seed=0), task, with_condition=with_condition)
    if randomise is not None:
        generator = torch.Generator().manual_seed(randomise)
        with torch.no_grad():
            for module in model.added_modules().values():
                for param in module.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator))
    return model


def refused(model, path, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load_added_weights(model, path, **kwargs)
    assert caught.value.field == "weights"
    return caught.value


def rewrite(path, target, metadata=None, drop=(), change=None):
    """A copy of a weights file with its header or tensors altered."""
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    if change:
        tensors.update(change)
    header.update(metadata or {})
    save_file(tensors, str(target), metadata=header)
    return target


@pytest.mark.parametrize("task", KIND)
def test_round_trip(task, tmp_path):
    source = model_for(task, randomise=1)
    path = save_added_weights(source, tmp_path / "caa.safetensors")
    assert not list(tmp_path.glob("*.partial"))
    target = model_for(task)
    report = load_added_weights(target, path)
    assert report.metadata["task"] == task and report.metadata["channels"] == "32,32,64,64"
    assert report.metadata["format_version"] == str(FORMAT_VERSION)
    assert report.missing == [] and report.unexpected == []
    saved = source.added_state_dict()
    assert sorted(report.loaded) == sorted(saved) and any(".resnet." in k for k in saved) == (task == "depth")
    for key, value in target.added_state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not any(key.startswith("unet.") for key in load_file(str(path)))  # the base UNet is not copied


def test_task_mismatch_is_named(tmp_path):
    path = save_added_weights(model_for("panorama"), tmp_path / "pano.safetensors")
    err = refused(model_for("depth"), path)
    assert "panorama weights" in err.problem and "depth MultiViewUNet" in err.problem


def test_header_mismatches_are_named(tmp_path):
    path = save_added_weights(model_for("panorama"), tmp_path / "a.safetensors")
    model = model_for("panorama", randomise=2)
    before = model.caa_mid.attention.to_q.weight.clone()

    sd2 = rewrite(path, tmp_path / "sd2.safetensors", {"channels": "320,640,1280,1280"})
    err = refused(model, sd2)
    assert "(320,640,1280,1280)" in err.problem and "(32,32,64,64)" in err.problem

    newer = rewrite(path, tmp_path / "newer.safetensors", {"format_version": str(FORMAT_VERSION + 1)})
    assert "format version" in refused(model, newer).problem

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    assert "not a file of MVDiffusion added weights" in refused(model, plain).problem

    ckpt = tmp_path / "pano.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert "load_released_checkpoint" in refused(model, ckpt).problem
    assert "does not exist" in refused(model, tmp_path / "absent.safetensors").problem
    assert torch.equal(model.caa_mid.attention.to_q.weight, before)


def test_strictness(tmp_path):
    source = model_for("depth", randomise=3)
    path = save_added_weights(source, tmp_path / "depth.safetensors")
    dropped = "caa_up.1.resnet.conv1.weight"
    partial = rewrite(path, tmp_path / "partial.safetensors", drop=[dropped],
                      change={"caa_extra.weight": torch.zeros(3)})
    err = refused(model_for("depth"), partial)
    assert "1 missing" in err.problem and dropped in err.problem and "caa_extra.weight" in err.problem

    target = model_for("depth")
    report = load_added_weights(target, partial, strict=False)
    assert report.missing == [dropped] and report.unexpected == ["caa_extra.weight"]
    assert torch.equal(target.caa_up[1].resnet.norm1.weight, source.caa_up[1].resnet.norm1.weight)

    reshaped = rewrite(path, tmp_path / "reshaped.safetensors", change={dropped: torch.zeros(1)})
    assert "another shape" in refused(model_for("depth"), reshaped, strict=False).problem


def test_condition_branch_travels_with_the_caa_weights(tmp_path):
    source = model_for("depth", randomise=4, with_condition=True)
    path = save_added_weights(source, tmp_path / "interp.safetensors")
    target = model_for("depth", with_condition=True)
    assert load_added_weights(target, path).metadata["modules"] == "caa_down,caa_mid,caa_up,condition"
    assert torch.equal(target.condition.mid.conv1.weight, source.condition.mid.conv1.weight)

    err = refused(model_for("depth"), path)
    assert "condition" in err.problem and "with_condition=True" in err.problem
    plain = model_for("depth")
    report = load_added_weights(plain, path, strict=False)
    assert report.missing == [] and all(key.startswith("condition.") for key in report.unexpected)
    assert torch.equal(plain.caa_mid.resnet.conv1.weight, source.caa_mid.resnet.conv1.weight)
