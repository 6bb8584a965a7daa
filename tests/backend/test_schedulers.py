"""Schedulers: DDIM stays the default everywhere; the fast ones run every pipeline and job on the tiny models.

A spy on each scheduler class's ``step`` records which instance of which class stepped, so every
test can see that the scheduler a job names is the one that ran, a new one per run.
"""

from __future__ import annotations

import argparse
import functools
import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from backend.__main__ import main as cli_main
from backend.cli_jobs import add_panorama_arguments, add_texture_arguments
from backend.engine import ModelConfig, ModelSet
from backend.geometry.keyframes import select_keyframes
from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.models.mv_unet import MultiViewUNet
from backend.models.schedulers import build_scheduler, clean_estimate
from backend.models.tiny import SD2_SCHEDULER, tiny_pipeline, tiny_scheduler
from backend.pipelines.context import JobContext
from backend.pipelines.hdri import make_panorama, run_panorama_job
from backend.pipelines.interpolation import InterpolationPipeline
from backend.pipelines.keyframes import KeyframePipeline
from backend.pipelines.outpaint import PanoramaOutpaintPipeline
from backend.pipelines.panorama import PanoramaPipeline
from backend.pipelines.sampling import MultiViewSampler, SamplingSettings, preview
from backend.pipelines.texturing import MAX_IN_BETWEEN, run_texture_job
from backend.protocol import GenerationSettings, PanoramaJob, TextureJob, pack_arrays, read_job
from backend.sampling_options import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    FAST_SCHEDULER,
    SCHEDULERS,
)
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError

FAST = [name for name in SCHEDULERS if name != DEFAULT_SCHEDULER]
CLASSES = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
STEPS = 3


class StepSpy:
    """Every ``step`` call of every listed scheduler class: (instance, timestep, output)."""

    def __init__(self):
        self.calls: list[tuple[object, int, object]] = []

    def classes(self) -> list[type]:
        return [type(instance) for instance, _, _ in self.calls]

    def instances(self) -> list[object]:
        unique = []
        for instance, _, _ in self.calls:
            if not any(instance is seen for seen in unique):
                unique.append(instance)
        return unique


@pytest.fixture
def spy(monkeypatch) -> StepSpy:
    recorder = StepSpy()
    for choice in SCHEDULERS.values():
        cls = getattr(diffusers, choice.diffusers_class)
        original = cls.step

        @functools.wraps(original)  # keeps the signature: the loop reads it to decide on ``eta``
        def step(self, model_output, timestep, sample, *args, _original=original, **kwargs):
            output = _original(self, model_output, timestep, sample, *args, **kwargs)
            recorder.calls.append((self, int(timestep), output))
            return output

        monkeypatch.setattr(cls, "step", step)
    return recorder


def sampler_for(kind: str, task: str) -> MultiViewSampler:
    pipe = tiny_pipeline(kind)
    model = MultiViewUNet(pipe.unet, task, with_condition=kind == "depth").eval()
    return MultiViewSampler(model, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


@pytest.fixture(scope="module")
def depth_sampler() -> MultiViewSampler:
    return sampler_for("depth", "depth")


@pytest.fixture(scope="module")
def panorama_sampler() -> MultiViewSampler:
    return sampler_for("base", "panorama")


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(24, width=64, height=64)[:5]
    return room, cameras, [render_depth(room.mesh, camera) for camera in cameras]


@pytest.fixture(scope="module")
def ring():
    return panorama_layout(size=64, ring_views=4, fov_deg=120.0, pole_views=False)


# ------------------------------------------------------------------ defaults and names, in every place
def test_ddim_at_50_steps_is_the_default_of_protocol_sampler_models_and_cli():
    assert DEFAULT_SCHEDULER == "ddim" and DEFAULT_STEPS == 50 and FAST_SCHEDULER in FAST
    assert SCHEDULERS[FAST_SCHEDULER].steps <= 25
    settings = GenerationSettings(["a room"]).validate()
    assert (settings.scheduler, settings.steps) == ("ddim", 50)
    assert (SamplingSettings().scheduler, SamplingSettings().steps) == ("ddim", 50)
    # A job from before the field existed reads as DDIM.
    old = pack_arrays({}, {"api_version": 1, "kind": "panorama", "settings": {"prompts": ["sky"], "steps": 4}})
    assert read_job(old).settings.scheduler == "ddim"
    # The models carry their schedule as DDIM, and a sampler asked for nothing builds DDIM.
    assert type(tiny_scheduler()) is DDIMScheduler
    sampler = sampler_for("base", "panorama")
    assert type(sampler.new_scheduler()) is DDIMScheduler
    parser = argparse.ArgumentParser()
    add_panorama_arguments(parser)
    args = parser.parse_args(["--prompt", "sky", "--out", "x"])
    assert (args.scheduler, args.steps) == ("ddim", 50)
    assert "ddim (the default, 50 steps)" in " ".join(parser.format_help().split())
    texture = argparse.ArgumentParser()
    add_texture_arguments(texture)
    assert texture.parse_args(["job.npz", "--out", "x"]).scheduler is None  # the job's own


def test_the_table_builds_each_class_with_its_options_on_the_models_schedule():
    schedule = tiny_scheduler().config
    for name, cls in CLASSES.items():
        scheduler = build_scheduler(name, schedule)
        assert type(scheduler) is cls
        for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset", "timestep_spacing"):
            assert scheduler.config[key] == schedule[key], (name, key)
        assert torch.equal(scheduler.alphas_cumprod, tiny_scheduler().alphas_cumprod)
    dpm = build_scheduler("dpm++2m", {**schedule, "algorithm_type": "sde-dpmsolver", "solver_order": 3})
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)


@pytest.mark.parametrize("bad", ["euler", "DDIM", "", None, 3])
def test_a_bad_scheduler_is_refused_naming_the_field(bad):
    with pytest.raises(InputError) as err:
        GenerationSettings(["a room"], scheduler=bad).validate()
    assert err.value.field == "scheduler"
    data = pack_arrays({}, {"api_version": 1, "kind": "panorama", "settings": {"prompts": ["sky"], "scheduler": bad}})
    with pytest.raises(InputError) as err:
        read_job(data)
    assert err.value.field == "scheduler" and "ddim" in err.value.problem
    with pytest.raises(InputError) as err:
        SamplingSettings(scheduler=bad).validated()
    assert err.value.field == "scheduler"


def test_a_job_built_in_code_with_a_bad_scheduler_fails_before_any_model_runs(scene, tmp_path, spy):
    room, cameras, depths = scene
    job = TextureJob(GenerationSettings(["a room"], steps=1, scheduler="euler"), cameras, depths, room.mesh, 64)
    with pytest.raises(InputError) as err:
        run_texture_job(job, ModelSet(ModelConfig.tiny()).sampler("depth"), JobContext(tmp_path))
    assert err.value.field == "scheduler" and not spy.calls
    from backend.train.consistency_bench import run_consistency_benchmark

    with pytest.raises(InputError, match="scheduler"):  # refused before it trains anything
        run_consistency_benchmark(run_dir=tmp_path / "run", scheduler="euler")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_bad_scheduler(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["panorama", "--prompt", "sky", "--scheduler", "euler", "--out", "x", "--models", "tiny"])
    assert err.value.code == 2 and "--scheduler" in capsys.readouterr().err


# ------------------------------------------------------------------ clean estimates for previews
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_estimate_is_ddims_pred_original_sample(prediction_type):
    scheduler = build_scheduler("ddim", {**SD2_SCHEDULER, "prediction_type": prediction_type})
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[:4]:
        sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
        expected = scheduler.step(output, t, sample).pred_original_sample
        assert torch.equal(clean_estimate(scheduler, output, t, sample), expected)


@pytest.mark.parametrize("name", FAST)
def test_clean_estimate_is_the_fast_schedulers_own_data_prediction(name):
    scheduler = build_scheduler(name, tiny_scheduler().config)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = scheduler.timesteps[0]
    scheduler._init_step_index(t)
    own = scheduler.convert_model_output(output, sample=sample)  # x0 of DPM-Solver++ and UniPC (predict_x0)
    torch.testing.assert_close(clean_estimate(scheduler, output, t, sample), own, rtol=1e-5, atol=1e-5)


def test_ddim_previews_are_its_pred_original_sample_at_every_step(scene, depth_sampler, spy):
    _, cameras, depths = scene
    seen = []
    KeyframePipeline(depth_sampler)("a room", cameras[:3], depths[:3], SamplingSettings(steps=STEPS, seed=2),
                                    progress=seen.append)
    assert spy.classes() == [DDIMScheduler] * STEPS and len(seen) == STEPS
    for info, (_, timestep, output) in zip(seen, spy.calls, strict=True):
        assert info.timestep == timestep
        assert torch.equal(info.predicted, output.pred_original_sample)


@pytest.mark.parametrize("name", FAST)
def test_fast_previews_are_finite_and_end_at_the_result(scene, depth_sampler, spy, name):
    _, cameras, depths = scene
    seen = []
    result = KeyframePipeline(depth_sampler)("a room", cameras[:3], depths[:3],
                                             SamplingSettings(steps=STEPS, seed=2, scheduler=name),
                                             progress=seen.append)
    assert spy.classes() == [CLASSES[name]] * STEPS
    assert [info.step for info in seen] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(info.predicted).all() for info in seen)
    shown = preview(depth_sampler, seen[-1], views=[0])
    assert shown.dtype == np.uint8 and shown.shape == (1, 64, 64, 3)
    if name == "dpm++2m":  # its last step lands on sigma 0: the result is the last clean estimate
        torch.testing.assert_close(seen[-1].predicted, result.latents, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ every pipeline with the fast schedulers
@pytest.mark.parametrize("name", FAST)
def test_keyframes_step_the_named_scheduler_a_new_one_per_run(scene, depth_sampler, spy, name):
    _, cameras, depths = scene
    pipeline = KeyframePipeline(depth_sampler)
    settings = SamplingSettings(steps=STEPS, seed=4, scheduler=name)
    first = pipeline("a room", cameras[:3], depths[:3], settings)
    second = pipeline("a room", cameras[:3], depths[:3], settings)
    ddim = pipeline("a room", cameras[:3], depths[:3], SamplingSettings(steps=STEPS, seed=4))
    assert spy.classes() == [CLASSES[name]] * 2 * STEPS + [DDIMScheduler] * STEPS
    assert len(spy.instances()) == 3  # one per run
    assert np.array_equal(first.images, second.images)
    assert not np.array_equal(first.images, ddim.images)  # the scheduler changed the result


@pytest.mark.parametrize("name", FAST)
def test_interpolation_runs_every_window_with_the_named_scheduler(scene, depth_sampler, spy, name):
    _, cameras, depths = scene
    overlap = np.clip(1.0 - np.abs(np.subtract.outer(np.arange(5), np.arange(5))) / 4.0, 0, 1)
    plan = select_keyframes(overlap, 0.3, 0.6)
    keyframes = KeyframePipeline(depth_sampler)
    settings = SamplingSettings(steps=STEPS, scheduler=name)
    keys = keyframes("a room", [cameras[k] for k in plan.keyframes], [depths[k] for k in plan.keyframes], settings)
    steps = []
    result = InterpolationPipeline(keyframes, max_in_between=1)(
        plan, dict(zip(plan.keyframes, keys.images, strict=True)), "a room", cameras, depths, settings,
        progress=lambda number, total, info: steps.append(info),
    )
    batches = sum(len(frames) for _, _, frames in plan.windows)
    assert batches >= 2 and len(result.images) == batches
    assert spy.classes() == [CLASSES[name]] * STEPS * (1 + batches)
    assert len(spy.instances()) == 1 + batches
    assert all(torch.isfinite(info.predicted).all() for info in steps)


@pytest.mark.parametrize("name", FAST)
def test_panorama_with_zero_caa_matches_diffusers_with_the_same_scheduler(ring, spy, name):
    """The loop does what diffusers' own pipeline does with this scheduler: noise scale, input scale, steps."""
    reference = tiny_pipeline("base")
    reference.scheduler = build_scheduler(name, reference.scheduler.config)
    sampler = sampler_for("base", "panorama")
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a beach", "the sea", "a forest", "a mountain"]
    expected = reference(prompts, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.0,
                         negative_prompt=[""] * 4, latents=latents.clone(), output_type="np").images
    spy.calls.clear()
    ours = PanoramaPipeline(sampler)(prompts, ring, SamplingSettings(steps=STEPS, guidance_scale=7.0, scheduler=name),
                                     latents=latents.clone(), output_float=True)
    assert spy.classes() == [CLASSES[name]] * STEPS
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)


@pytest.mark.parametrize("name", FAST)
def test_outpainting_runs_with_the_named_scheduler(ring, spy, name):
    sampler = sampler_for("inpaint", "panorama")
    given = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    seen = []
    result = PanoramaOutpaintPipeline(sampler)(given, "a harbour", ring,
                                               SamplingSettings(steps=STEPS, scheduler=name), progress=seen.append)
    assert spy.classes() == [CLASSES[name]] * STEPS
    assert result.images.shape == (4, 64, 64, 3) and all(torch.isfinite(i.predicted).all() for i in seen)


@pytest.fixture(scope="module")
def models():
    return ModelSet(ModelConfig.tiny())


@pytest.fixture(scope="module")
def trajectory_scene():
    """Eight close poses: keyframes [0, 4, 7] with frames in between (as in test_texturing.py)."""
    room = build_demo_room()
    cameras = trajectory(72, width=128, height=64)[:8]
    return room, cameras, [render_depth(room.mesh, camera) for camera in cameras]


@pytest.mark.parametrize("name", FAST)
def test_texture_job_runs_keyframes_and_interpolation_with_the_named_scheduler(trajectory_scene, models, spy,
                                                                               tmp_path, name):
    room, cameras, depths = trajectory_scene
    job = TextureJob(GenerationSettings(["a room"], steps=2, seed=1, scheduler=name), cameras, depths, room.mesh, 64)
    previews = []
    ctx = JobContext(tmp_path, on_preview=previews.append, preview_every=1)
    report = run_texture_job(job, models.sampler("depth"), ctx)
    keys = report["keyframes"]
    # The keyframes in one run, then one interpolation batch per window that has frames between its ends.
    batches = sum(1 for a, b in zip(keys[:-1], keys[1:], strict=True) if b - a > 1)
    assert batches >= 1 and len(cameras) - len(keys) <= MAX_IN_BETWEEN
    assert spy.classes() == [CLASSES[name]] * 2 * (1 + batches)
    assert len(spy.instances()) == 1 + batches
    assert (report["scheduler"], report["steps"]) == (name, 2)
    assert json.loads((tmp_path / "report.json").read_text())["scheduler"] == name
    assert previews and all(p.dtype == np.uint8 for p in previews)


def panorama_job(scheduler: str, steps: int = 2) -> PanoramaJob:
    return PanoramaJob(GenerationSettings(["a sunny beach"], steps=steps, seed=5, scheduler=scheduler),
                       equirect_height=64, view_size=64)


@pytest.mark.parametrize("name", FAST)
def test_hdri_job_runs_with_the_named_scheduler_and_reports_it(models, spy, tmp_path, name):
    previews = []
    ctx = JobContext(tmp_path, on_preview=previews.append, preview_every=1)
    report = run_panorama_job(panorama_job(name), models.sampler("panorama"), ctx)
    assert spy.classes() == [CLASSES[name]] * 2
    assert (report["scheduler"], report["steps"]) == (name, 2)
    assert json.loads((tmp_path / "report.json").read_text())["scheduler"] == name
    assert len(previews) == 2 and all(p.dtype == np.uint8 and p.shape == (64, 64, 3) for p in previews)


def test_cli_passes_the_scheduler_to_both_commands(tmp_path, spy, scene):
    out = tmp_path / "panorama"
    assert cli_main(["panorama", "--prompt", "sky", "--scheduler", "unipc", "--steps", "2", "--height", "64",
                     "--view-size", "64", "--models", "tiny", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["scheduler"] == "unipc"
    assert spy.classes() == [UniPCMultistepScheduler] * 2
    room, cameras, depths = scene
    path = tmp_path / "job.npz"
    path.write_bytes(TextureJob(GenerationSettings(["a room"], steps=1), cameras[:2], depths[:2], room.mesh,
                                64).to_bytes())
    spy.calls.clear()
    assert cli_main(["texture", str(path), "--scheduler", "dpm++2m", "--steps", "2", "--models", "tiny",
                     "--out", str(tmp_path / "texture")]) == 0
    report = json.loads((tmp_path / "texture" / "report.json").read_text())
    assert (report["scheduler"], report["steps"]) == ("dpm++2m", 2)
    assert set(spy.classes()) == {DPMSolverMultistepScheduler}


# ------------------------------------------------------------------ a shared sampler stays as it was
def test_jobs_in_sequence_give_what_each_gives_alone(tmp_path):
    shared = ModelSet(ModelConfig.tiny())
    sampler = shared.sampler("panorama")
    schedule = dict(sampler.schedule)

    def views(models: ModelSet, scheduler: str) -> np.ndarray:
        return make_panorama(panorama_job(scheduler), models.sampler("panorama"), JobContext(tmp_path)).views

    ddim_first = views(shared, "ddim")
    fast = views(shared, FAST_SCHEDULER)
    unipc = views(shared, "unipc")
    ddim_again = views(shared, "ddim")
    fast_alone = views(ModelSet(ModelConfig.tiny()), FAST_SCHEDULER)
    unipc_alone = views(ModelSet(ModelConfig.tiny()), "unipc")
    assert np.array_equal(ddim_first, ddim_again)
    assert np.array_equal(fast, fast_alone) and np.array_equal(unipc, unipc_alone)
    assert not np.array_equal(fast, ddim_first)
    assert dict(sampler.schedule) == schedule and not hasattr(sampler, "scheduler")


def test_a_run_started_inside_another_run_leaves_it_untouched(ring, panorama_sampler):
    """One sampler, two runs of one multistep scheduler interleaved: each gives what it gives alone."""
    pipeline = PanoramaPipeline(panorama_sampler)
    outer_settings = SamplingSettings(steps=4, seed=1, scheduler=FAST_SCHEDULER)
    inner_settings = SamplingSettings(steps=3, seed=2, scheduler=FAST_SCHEDULER)
    outer_alone = pipeline("a beach", ring, outer_settings, output_float=True).images
    inner_alone = pipeline("a forest", ring, inner_settings, output_float=True).images
    inner = []

    def run_inner(info):
        if info.step in (1, 2):
            inner.append(pipeline("a forest", ring, inner_settings, output_float=True).images)

    outer = pipeline("a beach", ring, outer_settings, progress=run_inner, output_float=True).images
    assert np.array_equal(outer, outer_alone)
    assert len(inner) == 2 and all(np.array_equal(images, inner_alone) for images in inner)
