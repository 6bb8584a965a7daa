"""Training: config checks, the two stages' losses and what they may change, save/resume, CLI, bench."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.__main__ import main
from backend.engine import ModelConfig, ModelSet
from backend.geometry.panorama import panorama_layout
from backend.models.caa import CorrespondenceAttention
from backend.models.caa_geometry import depth_geometry
from backend.pipelines import keyframes as keyframes_module
from backend.pipelines import panorama as panorama_module
from backend.pipelines.keyframes import KeyframePipeline
from backend.pipelines.panorama import PanoramaPipeline
from backend.pipelines.sampling import SamplingSettings
from backend.train.config import TrainConfig
from backend.train.geometry import sample_geometry, stack_geometry, trajectory_geometry, trajectory_neighbours
from backend.train.models import build_models
from backend.train.prepared import drop_prompts, interpolation_condition
from backend.train.synthetic import SyntheticDepthData
from backend.train.trainer import Batch, Trainer
from backend.validation import InputError

RECIPE = Path(__file__).resolve().parents[2] / "backend" / "train" / "recipes" / "tiny_depth.json"


def tiny_recipe(**overrides) -> dict:
    recipe = {
        "data": {"train": 2, "heldout": 1, "views": 3, "width": 64, "height": 64},
        "autoencoder": {"steps": 1, "batch_size": 2, "lr": 1e-3},
        "single_view": {"steps": 1, "batch_size": 4, "lr": 1e-3},
        "multi_view": {"steps": 2, "batch_size": 2, "lr": 1e-3, "interpolation_ratio": 0.5},
        "gradient_checkpointing": False,
        "log_every": 1,
        "save_every": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            recipe[key] = {**recipe.get(key, {}), **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture(scope="module")
def samples():
    data = SyntheticDepthData(2, views=3, width=64, height=64, seed=0)
    return [data[k] for k in range(len(data))]


def make_trainer(path, samples, **overrides) -> Trainer:
    return Trainer(TrainConfig.from_dict(tiny_recipe(**overrides)), path, train_data=samples)


def state_of(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"multi_view": {"lrr": 1e-4}}, "multi_view.lrr", "did you mean 'lr'"),
        ({"single_view": {"steps": "ten"}}, "single_view.steps", "integer"),
        ({"data": {"step_deg": [10, 5]}}, "data.step_deg", "low <= high"),
        ({"data": {"multi_view_train": -1}}, "data.multi_view_train", ">= 0"),
        ({"multi_view": {"lr": -1.0}}, "multi_view.lr", "positive"),
        ({"single_view": {"high_noise_weight": 0.5}}, "single_view.high_noise_weight", "[1.0,"),
        ({"prompt_dropout": 1.5}, "prompt_dropout", "[0.0, 1.0]"),
        ({"data": {"width": 48}}, "data.width", "multiple of 64"),
        ({"data": {"views": 1}}, "data.views", "2 views"),
        ({"model": {"vae_channels": [8, 16, 32, 65], "vae_groups": 8}}, "model.vae_groups", "divide"),
        ({"model": {"vae_groups": 2}}, "model.vae_groups", "8 channels per group"),
        ({"model": {"unet_groups": 3}}, "model.unet_groups", "divide 32"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", "true or false"),
        ({"mixed_precision": "fp8"}, "mixed_precision", "bf16"),
        ({"multi_view": {"interpolation_ratio": 2}}, "multi_view.interpolation_ratio", "[0.0, 1.0]"),
        ({"data": [1, 2]}, "data", "JSON object"),
        ({"task": "sketch"}, "task", "depth, panorama"),
        ({"task": "panorama"}, "data.views", "8 or 10 views"),
        ({"task": "panorama", "data": {"views": 8, "height": 128}}, "data.height", "square"),
    ],
)
def test_config_errors_name_the_field(change, field, words):
    recipe = tiny_recipe()
    for key, value in change.items():
        nested = isinstance(value, dict) and isinstance(recipe.get(key), dict)
        recipe[key] = {**recipe[key], **value} if nested else value
    with pytest.raises(InputError) as err:
        TrainConfig.from_dict(recipe)
    assert err.value.field == field
    assert words in str(err.value)


def test_config_round_trips_and_the_shipped_recipe_loads(tmp_path):
    config = TrainConfig.from_dict(tiny_recipe())
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    path = tmp_path / "recipe.json"
    path.write_text(config.to_json())
    assert TrainConfig.load(path) == config
    shipped = TrainConfig.load(RECIPE)
    assert shipped.multi_view.steps > 0 and shipped.prompt_dropout > 0
    with pytest.raises(InputError) as err:
        TrainConfig.load(tmp_path / "missing.json")
    assert err.value.field == "config"


# ---------------------------------------------------------------------- geometry
def test_training_geometry_is_the_keyframe_pipelines(samples, monkeypatch):
    """The trainer's neighbours and geometry are exactly what the pipeline builds for the same views."""
    sample = samples[0]
    seen = {}
    real = keyframes_module.depth_geometry

    def spy(cameras, depths, neighbours, **kwargs):
        seen["neighbours"] = neighbours
        seen["geometry"] = real(cameras, depths, neighbours, **kwargs)
        return seen["geometry"]

    monkeypatch.setattr(keyframes_module, "depth_geometry", spy)
    sampler = ModelSet(ModelConfig.tiny()).sampler("depth")
    KeyframePipeline(sampler)(sample.prompts, sample.cameras, list(sample.depths), SamplingSettings(steps=1))
    assert seen["neighbours"] == trajectory_neighbours(sample.cameras, list(sample.depths))
    assert any(seen["neighbours"])
    ours = trajectory_geometry(sample.cameras, list(sample.depths))
    assert ours.keys() == seen["geometry"].keys()
    for size, level in ours.items():
        other = seen["geometry"][size]
        for name in ("source_view", "grid", "valid", "encoding_input"):
            assert torch.equal(getattr(level, name), getattr(other, name)), (size, name)


def test_panorama_training_geometry_is_the_panorama_pipelines(monkeypatch):
    """A panorama sample's geometry is what the panorama pipeline builds for its cameras: rotation-only."""
    cameras = panorama_layout(64, pole_views=False)
    seen = {}
    real = panorama_module.panorama_geometry

    def spy(cameras, neighbours, **kwargs):
        seen["geometry"] = real(cameras, neighbours, **kwargs)
        return seen["geometry"]

    monkeypatch.setattr(panorama_module, "panorama_geometry", spy)
    sampler = ModelSet(ModelConfig.tiny()).sampler("panorama")
    PanoramaPipeline(sampler)("a beach", cameras, SamplingSettings(steps=1))
    ours = sample_geometry("panorama", cameras, None)
    assert ours.keys() == seen["geometry"].keys()
    for size, level in ours.items():
        other = seen["geometry"][size]
        for name in ("source_view", "grid", "valid", "encoding_input"):
            assert torch.equal(getattr(level, name), getattr(other, name)), (size, name)
    # Each ring view reads its two ring neighbours.
    assert sorted(ours[(8, 8)].source_view[0].tolist()) == [1, 7]


def test_stacked_geometry_equals_one_geometry_of_all_views(samples):
    """Trajectories batched together: block-diagonal neighbours, one trajectory without any."""
    cams = [s.cameras for s in samples] + [samples[0].cameras]
    deps = [list(s.depths) for s in samples] + [list(samples[0].depths)]
    parts = [trajectory_geometry(c, d) for c, d in zip(cams[:2], deps[:2], strict=True)] + [None]
    stacked = stack_geometry(parts, [3, 3, 3])
    neighbours, offset = [], 0
    for k, (c, d) in enumerate(zip(cams, deps, strict=True)):
        rows = trajectory_neighbours(c, d) if k < 2 else [[] for _ in c]
        neighbours += [[j + offset for j in row] for row in rows]
        offset += len(c)
    expected = depth_geometry(sum(cams, []), sum(deps, []), neighbours)
    assert stacked.keys() == expected.keys()
    for size, level in stacked.items():
        for name in ("grid", "valid", "encoding_input"):
            assert torch.equal(getattr(level, name), getattr(expected[size], name)), (size, name)
        # Unused slots (a view with fewer neighbours than the most connected one) read no view:
        # every token of theirs is invalid and outside the map, whatever view index they hold.
        for view, row in enumerate(neighbours):
            assert level.source_view[view, : len(row)].tolist() == row
            assert not level.valid[view, :, len(row):].any()


def test_caa_backward_is_correct():
    """The CAA block's fast path under autograd (training) gives the gradients finite differences give."""
    torch.manual_seed(0)
    block = CorrespondenceAttention(32, 1).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    sample = SyntheticDepthData(1, views=3, width=64, height=64, seed=1)[0]
    level = trajectory_geometry(sample.cameras, list(sample.depths))[(8, 8)].to("cpu", torch.float64)
    hidden = torch.randn(3, 32, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = block.to_v.weight
    assert torch.autograd.gradcheck(lambda h, w: block(h, level), (hidden, weight), fast_mode=True, atol=1e-5)


# ---------------------------------------------------------------------- steps
@pytest.mark.parametrize("stage", ["autoencoder", "single_view", "multi_view"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path, samples, stage):
    # The box codec starts at a good reconstruction that a full-rate first Adam step can overshoot;
    # the step's effect is what is tested here, so the autoencoder starts from random weights.
    model = {"vae_init": "random"} if stage == "autoencoder" else {}
    trainer = make_trainer(tmp_path, samples, prompt_dropout=0.0, model=model)
    batch = trainer.make_batch(stage, 0)
    with torch.no_grad():
        before = float(trainer.loss(batch))
    trainer.optimise(batch)
    with torch.no_grad():
        after = float(trainer.loss(batch))
    assert after < before


def test_high_noise_weight_scales_the_noisiest_samples_only(tmp_path, samples):
    plain = make_trainer(tmp_path / "plain", samples, prompt_dropout=0.0)
    weighted = make_trainer(tmp_path / "weighted", samples, prompt_dropout=0.0,
                            single_view={"high_noise_weight": 50.0})
    weighted.models.unet.load_state_dict(plain.models.unet.state_dict())
    batch = plain.make_batch("single_view", 0)
    alphas = plain.models.scheduler.alphas_cumprod
    for t, weight in ((999, 50.0), (0, 1.0)):  # 1/SNR is 212 at t = 999 (capped) and ~0 at t = 0 (floored)
        assert (1 - alphas[t]) / alphas[t] > 50 if t else (1 - alphas[t]) / alphas[t] < 1
        batch.timesteps = torch.full_like(batch.timesteps, t)
        with torch.no_grad():
            ratio = float(weighted.loss(batch)) / float(plain.loss(batch))
        assert ratio == pytest.approx(weight, rel=1e-4)


def test_stage_two_trains_only_the_added_modules(tmp_path, samples):
    trainer = make_trainer(tmp_path, samples)
    models = trainer.models
    trainer.prepare_stage("multi_view")
    frozen = {"unet": state_of(models.unet), "vae": state_of(models.vae), "text": state_of(models.text_encoder)}
    added = {name: state_of(module) for name, module in models.model.added_modules().items()}
    assert not any(p.requires_grad for p in models.unet.parameters())
    assert not any(p.requires_grad for p in models.vae.parameters())
    generation = trainer.make_batch("multi_view", 0)
    generation.keyframes = None
    interpolation = Batch(**{**generation.__dict__, "keyframes": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)})
    trainer.optimise(generation)
    trainer.optimise(interpolation)
    assert same(frozen["unet"], state_of(models.unet))  # bit-identical
    assert same(frozen["vae"], state_of(models.vae))
    assert same(frozen["text"], state_of(models.text_encoder))
    for name, module in models.model.added_modules().items():
        assert not same(added[name], state_of(module)), f"{name} did not train"


def test_prompts_are_dropped_at_the_configured_rate(tmp_path, samples):
    generator = torch.Generator().manual_seed(0)
    assert abs(float(drop_prompts(200_000, 0.1, generator).float().mean()) - 0.1) < 0.003
    assert not drop_prompts(1000, 0.0, generator).any() and drop_prompts(1000, 1.0, generator).all()

    seen = []
    for rate, expect_dropped in ((1.0, True), (0.0, False)):
        trainer = make_trainer(tmp_path / str(rate), samples, prompt_dropout=rate)
        data = trainer.data()
        assert data.prompts[0] == ""
        hook = trainer.models.model.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
        for stage in ("single_view", "multi_view"):
            batch = trainer.make_batch(stage, 3)
            assert bool(batch.dropped.all()) == expect_dropped and bool(batch.dropped.any()) == expect_dropped
            seen.clear()
            with torch.no_grad():
                trainer.loss(batch)
            empty = data.embeddings[0]
            assert all(torch.equal(row, empty) == expect_dropped for row in seen[0])
        hook.remove()
    # A multi-view sample drops the prompt of all its views together.
    trainer = make_trainer(tmp_path / "half", samples, prompt_dropout=0.5)
    for step in range(20):
        dropped = trainer.make_batch("multi_view", step).dropped.view(-1, 3)
        assert (dropped == dropped[:, :1]).all()


def test_stage_two_can_train_on_scenes_stage_one_never_saw(tmp_path):
    recipe = tiny_recipe(data={"train": 1, "multi_view_train": 2})
    trainer = Trainer(TrainConfig.from_dict(recipe), tmp_path)
    single, multi = trainer.data("single_view"), trainer.data("multi_view")
    assert (single.count, multi.count) == (1, 2)
    flat = single.images.flatten(1)
    assert not any(torch.equal(flat[0], other) for other in multi.images.flatten(1))
    assert int(trainer.make_batch("multi_view", 0).index.max()) < 2
    reused = Trainer(TrainConfig.from_dict(tiny_recipe(data={"train": 1})), tmp_path / "reused")
    assert reused.data("multi_view") is reused.data("single_view")


def test_condition_branch_never_sees_views_being_generated(tmp_path, samples):
    trainer = make_trainer(tmp_path, samples)
    trainer.prepare_stage("multi_view")
    model = trainer.models.model
    received, conditions = [], []
    hooks = [
        model.condition.conv_in.register_forward_pre_hook(lambda module, args: received.append(args[0].clone())),
        model.register_forward_pre_hook(lambda module, args: conditions.append(args[4] if len(args) > 4 else None)),
    ]
    data = trainer.data()
    for step in range(12):
        batch = trainer.make_batch("multi_view", step)
        received.clear()
        conditions.clear()
        trainer.optimise(batch)
        if batch.keyframes is None:  # keyframe generation: no condition at all, as at inference
            assert received == [] and conditions == [None]
            continue
        (condition,) = received
        keyframes = batch.keyframes.view(-1, 3)
        assert keyframes[:, 0].all() and keyframes[:, -1].all() and not keyframes[:, 1:-1].any()
        generated = ~batch.keyframes
        assert not condition[generated].any(), "latents of generated views reached the condition branch"
        truth = data.latents[batch.index].flatten(0, 1)
        assert torch.equal(condition[batch.keyframes, :4], truth[batch.keyframes])
        assert (condition[batch.keyframes, 4] == 1).all()
    for hook in hooks:
        hook.remove()
    kinds = {trainer.make_batch("multi_view", s).keyframes is None for s in range(12)}
    assert kinds == {True, False}  # both kinds of step occurred
    latents = torch.randn(4, 4, 8, 8)
    condition = interpolation_condition(latents, torch.tensor([True, False, False, True]))
    assert not condition[1:3].any() and torch.equal(condition[0, :4], latents[0])


# ---------------------------------------------------------------------- save and resume
def test_resume_continues_with_identical_optimizer_state(tmp_path, samples):
    recipe = tiny_recipe(multi_view={"steps": 4})
    config = TrainConfig.from_dict(recipe)
    first = Trainer(config, tmp_path / "a", train_data=samples)
    report = first.run(max_steps=4)  # autoencoder 1 + single view 1 + two multi-view steps
    assert not report["finished"] and report["stage"] == "multi_view" and report["step"] == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = Trainer(config, tmp_path / "b", train_data=samples)
    assert (second.state.stage, second.state.step) == ("multi_view", 2)
    second.prepare_stage("multi_view")
    a, b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)
    assert first.lr_schedule.state_dict() == second.lr_schedule.state_dict()
    for name, module in first.models.model.added_modules().items():
        assert same(state_of(module), state_of(second.models.model.added_modules()[name]))
    assert same(state_of(first.models.unet), state_of(second.models.unet))
    assert first.scaling_factor == second.scaling_factor
    first.run()
    second.run()
    assert first.report()["finished"] and second.report()["finished"]
    for name, module in first.models.model.added_modules().items():
        assert same(state_of(module), state_of(second.models.model.added_modules()[name])), name
    with pytest.raises(InputError) as err:  # a run folder keeps its recipe
        Trainer(TrainConfig.from_dict(tiny_recipe(multi_view={"steps": 5})), tmp_path / "a", train_data=samples)
    assert err.value.field == "multi_view.steps"
    # A run started before a field existed resumes while the field keeps its default.
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    del saved["model"]["unet_groups"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(saved))
    assert Trainer(config, tmp_path / "a", train_data=samples).finished


# ---------------------------------------------------------------------- command line and bench
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-cli")
    recipe = folder / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(
        autoencoder={"steps": 2}, single_view={"steps": 2}, multi_view={"steps": 2}, gradient_checkpointing=True,
        model={"unet_groups": 8},
    )))
    assert main(["train", "--config", str(recipe), "--out", str(folder / "run"), "--no-progress"]) == 0
    return folder


def test_train_command_runs_every_stage_and_writes_a_loadable_model(trained_run, capsys):
    run = trained_run / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("autoencoder", 1), ("autoencoder", 2), ("single_view", 1), ("single_view", 2),
        ("multi_view", 1), ("multi_view", 2),
    ]
    assert all(np.isfinite(r["loss"]) for r in rows)
    report = json.loads((run / "report.json").read_text())
    assert report["finished"] and report["completed"] == ["autoencoder", "single_view", "multi_view"]
    assert set(report["stage_seconds"]) == {"autoencoder", "single_view", "multi_view"}
    assert not list(run.glob("checkpoint-*"))  # finished stages keep no checkpoint
    sampler = ModelSet(ModelConfig(root=str(run / "model"), device="cpu", dtype="float32")).sampler("depth")
    assert sampler.vae.config.scaling_factor == pytest.approx(report["metrics"]["autoencoder_scaling_factor"])
    # The recipe's UNet normalisation comes back, and the CAA blocks' ResNets follow it.
    assert sampler.model.unet.config.norm_num_groups == 8
    assert {m.num_groups for m in sampler.model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    sample = SyntheticDepthData(1, views=3, width=64, height=64, split="heldout")[0]
    result = KeyframePipeline(sampler)(sample.prompts, sample.cameras, list(sample.depths), SamplingSettings(steps=2))
    assert result.images.shape == (3, 64, 64, 3)
    # Running the command again finds the run finished and trains nothing more.
    capsys.readouterr()
    assert main(["train", "--config", str(trained_run / "recipe.json"), "--out", str(run), "--no-progress"]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert len((run / "log.jsonl").read_text().splitlines()) == len(rows)


def test_train_command_names_a_bad_field(tmp_path, capsys):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps(tiny_recipe(multi_view={"batch_sise": 2})))
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "multi_view.batch_sise: unknown field (did you mean 'batch_size'?)" in capsys.readouterr().err


def test_consistency_bench_scores_a_saved_run(trained_run, capsys):
    code = main(["bench", "consistency", "--run", str(trained_run / "run"), "--json", "--steps", "2",
                 "--heldout", "1", "--panoramas", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ratio_caa", "ratio_no_caa", "views", "train_seconds", "psnr_truth_db"):
        assert key in result
    for row in ("independent", "caa", "attention", "sync"):  # every mode, scored three ways
        assert 0 < result[f"ratio_{row}"] and result[f"detail_ratio_{row}"] > 0 and result[f"colour_error_{row}"] >= 0
    assert result["detail_ratio_independent"] == 1.0 and result["ratio_independent"] == result["ratio_no_caa"]
    assert result["panorama_views"] == 10 and result["panorama_ratio_training_free"] > 0
    assert result["views"] == 3 and result["trajectories"] == 1 and not result["trained_here"]
    # One trajectory whose pairs all score: each ratio is the quotient of the two mean PSNRs.
    truth = result["psnr_truth_db"]
    assert result["ratio_caa"] == pytest.approx(result["psnr_caa_db"] / truth, abs=1e-3)
    assert result["ratio_no_caa"] == pytest.approx(result["psnr_no_caa_db"] / truth, abs=1e-3)
    assert result["ratio_gap"] == pytest.approx(result["ratio_caa"] - result["ratio_no_caa"], abs=2e-4)
    # The training time is the saved run's, not a new one.
    state = json.loads((trained_run / "run" / "state.json").read_text())
    assert result["train_seconds"] == pytest.approx(sum(state["seconds"].values()), abs=0.01)
    assert (trained_run / "run" / "consistency_sheet.png").is_file()


def test_train_runs_a_step_on_a_scannet_layout_folder(tmp_path, capsys, monkeypatch):
    from test_train_data import _write_scene

    from backend.train.released_data import ScanNetScenes

    root = tmp_path / "scannet"
    _write_scene(root / "train", "scene0000_00", range(8), keyframes=[0, 2, 3, 5, 7])
    read = []
    real_getitem = ScanNetScenes.__getitem__
    monkeypatch.setattr(ScanNetScenes, "__getitem__", lambda self, k: read.append(k) or real_getitem(self, k))
    recipe = tmp_path / "recipe.json"
    # One multi-view step: the stage that uses the depths and poses, through CAA.
    recipe.write_text(json.dumps(tiny_recipe(autoencoder={"steps": 0}, single_view={"steps": 0},
                                             multi_view={"steps": 1, "batch_size": 1})))
    run = tmp_path / "run"
    argv = ["train", "--config", str(recipe), "--out", str(run), "--no-progress"]
    assert main([*argv, "--data", "scannet", str(root)]) == 0
    assert read, "the samples came from the ScanNet folder"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(row["stage"], row["step"]) for row in rows] == [("multi_view", 1)]
    assert json.loads((run / "state.json").read_text())["completed"][-1] == "multi_view"
    assert main([*argv, "--data", "scannet", str(tmp_path / "none")]) == 2
    assert "data: no such folder" in capsys.readouterr().err
    assert main([*argv, "--data", "kitti", str(root)]) == 2
    assert "data: must be one of scannet, mp3d" in capsys.readouterr().err
    assert main([*argv, "--data", "mp3d", str(root)]) == 2  # mp3d trains the panorama model: 8 views
    assert "data.views: a panorama has 8 or 10 views" in capsys.readouterr().err


def test_a_panorama_recipe_trains_on_synthetic_landscapes(tmp_path):
    recipe = tiny_recipe(task="panorama", data={"train": 1, "heldout": 1, "views": 10},
                         autoencoder={"steps": 0}, single_view={"steps": 1, "batch_size": 2},
                         multi_view={"steps": 1, "batch_size": 1})
    trainer = Trainer(TrainConfig.from_dict(recipe), tmp_path / "run")
    data = trainer.data("multi_view")
    assert data.views == 10 and data.depth_channels.shape[2] == 0  # ring and poles; latents alone
    report = trainer.run()
    assert report["finished"] and report["completed"] == ["autoencoder", "single_view", "multi_view"]
    assert all(step.keyframes is None for step in (trainer.make_batch("multi_view", k) for k in range(8)))
    assert (tmp_path / "run" / "model" / "base" / "caa.safetensors").is_file()


def test_train_runs_a_panorama_step_on_a_matterport_skybox_folder(tmp_path, capsys):
    from safetensors.torch import load_file
    from test_train_data import _write_skybox

    root = _write_skybox(tmp_path / "mp3d")
    recipe = tmp_path / "recipe.json"
    # A depth recipe whose views fit Matterport3D's ring (8 views, square): the data set makes it a panorama run.
    recipe.write_text(json.dumps(tiny_recipe(data={"views": 8}, autoencoder={"steps": 0}, single_view={"steps": 0},
                                             multi_view={"steps": 2, "batch_size": 1})))
    run = tmp_path / "run"
    argv = ["train", "--config", str(recipe), "--out", str(run), "--no-progress", "--data", "mp3d", str(root)]
    assert main([*argv, "--max-steps", "1"]) == 0
    assert "mp3d trains the panorama model" in capsys.readouterr().out
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert config.task == "panorama"
    initial = build_models(config).model
    assert initial.unet.config.in_channels == 4  # SD 2 base: latents only, no depth channel
    assert set(initial.added_modules()) == {"caa_down", "caa_mid", "caa_up"}  # no condition branch
    before = initial.added_state_dict()
    trained = load_file(str(run / "checkpoint-multi_view-1" / "weights.safetensors"))
    assert trained.keys() == before.keys()

    def block(key):
        return key.split(".")[0] if key.startswith("caa_mid.") else ".".join(key.split(".")[:2])

    changed = {block(k) for k in before if not torch.equal(trained[k], before[k])}
    assert len({block(k) for k in before}) == 9 and len(changed) == 9
    zero = [k for k, v in before.items() if not v.any()]  # the zero-initialised outputs: moved by gradients only
    assert zero and any(trained[k].any() for k in zero)
    # The same command finishes the stage; the exported model serves the panorama task with the trained blocks.
    assert main(argv) == 0
    assert (run / "model" / "base" / "caa.safetensors").is_file()
    sampler = ModelSet(ModelConfig(root=str(run / "model"), device="cpu", dtype="float32")).sampler("panorama")
    served = sampler.model.added_state_dict()
    final = load_file(str(run / "model" / "base" / "caa.safetensors"))
    assert served.keys() == final.keys() and all(torch.equal(served[k], final[k]) for k in final)
    assert any(served[k].any() for k in zero)
    result = PanoramaPipeline(sampler)("a room", panorama_layout(64, pole_views=False), SamplingSettings(steps=1))
    assert result.images.shape == (8, 64, 64, 3)
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path)]) == 2
    assert "holds no train.npy" in capsys.readouterr().err
