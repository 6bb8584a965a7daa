"""Whole jobs in the training-free mode on the tiny models, and how a job's mode is chosen."""

import json

import pytest
import torch

from backend.engine import ModelConfig, ModelSet
from backend.geometry.render import render_depth
from backend.models.schedulers import build_scheduler, clean_estimate, model_output_from_clean
from backend.models.tiny import SD2_SCHEDULER
from backend.pipelines.context import JobContext
from backend.pipelines.hdri import run_panorama_job
from backend.pipelines.texturing import run_texture_job
from backend.protocol import GenerationSettings, PanoramaJob, TextureJob, read_job
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError


@pytest.fixture(scope="module")
def models():
    return ModelSet(ModelConfig.tiny())


def texture_job(mode):
    room = build_demo_room()
    cameras = trajectory(72, width=128, height=64)[:6]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    settings = GenerationSettings(["a cosy living room"], steps=2, seed=1, mode=mode)
    return TextureJob(settings, cameras, depths, room.mesh, 128, room.object_names)


def test_texture_job_in_training_free_mode_writes_everything_and_says_so(models, tmp_path):
    job = texture_job("training_free")
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path), models.describe("depth"),
                             models.resolve_mode("depth", job.settings.mode))
    assert report["mode"] == "training_free"
    assert json.loads((tmp_path / "report.json").read_text())["mode"] == "training_free"
    assert (tmp_path / "texture.png").is_file()
    assert len(list((tmp_path / "frames").iterdir())) == len(job.cameras)
    assert len(report["keyframes"]) < len(job.cameras)  # frames between keyframes were filled too


def test_panorama_job_in_training_free_mode_writes_the_hdri(models, tmp_path):
    job = PanoramaJob(GenerationSettings(["a beach"], steps=2, seed=3, mode="training_free"), 64, 64)
    report = run_panorama_job(job, models.sampler("panorama"), JobContext(tmp_path), models.describe("panorama"),
                              models.resolve_mode("panorama", job.settings.mode))
    assert report["mode"] == "training_free"
    assert (tmp_path / "panorama.exr").is_file() and report["views"] == 10


def test_mode_travels_on_the_wire_is_checked_and_defaults_to_the_best_available(models):
    job = PanoramaJob(GenerationSettings(["a beach"], mode="independent"))
    assert read_job(job.to_bytes()).settings.mode == "independent"
    with pytest.raises(InputError) as err:
        GenerationSettings(["a beach"], mode="magic").validate()
    assert err.value.field == "mode"
    assert models.resolve_mode("panorama", None) == "trained"  # the tiny model's blocks are loaded
    bare = ModelSet(ModelConfig(depth="somewhere/sd2-depth", base="somewhere/sd2-base"))
    assert bare.resolve_mode("depth", None) == "training_free"
    with pytest.raises(InputError) as err:
        bare.resolve_mode("depth", "trained")
    assert err.value.field == "mode"


@pytest.mark.parametrize("name", ["ddim", "dpm++2m"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_step_from_an_unchanged_clean_estimate_is_the_plain_step(name, prediction):
    scheduler = build_scheduler(name, {**SD2_SCHEDULER, "prediction_type": prediction})
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    clean = clean_estimate(scheduler, output, t, sample)
    assert torch.allclose(model_output_from_clean(scheduler, clean, t, sample), output, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_synchronising_identical_views_changes_nothing_and_different_views_come_together(models, scheduler):
    from backend.geometry.canvas import latent_depth, mesh_canvas
    from backend.geometry.uv_atlas import ensure_uvs
    from backend.models.depth_control import depth_channel
    from backend.pipelines.sampling import SamplingSettings
    from backend.pipelines.training_free import TrainingFree

    sampler = models.sampler("depth")
    room = build_demo_room()
    camera = trajectory(72, width=128, height=64)[0]
    depth = render_depth(room.mesh, camera)
    mesh = ensure_uvs(room.mesh, 256, 2).mesh
    canvas = mesh_canvas(mesh, [camera.scaled(1 / 8)] * 2, [latent_depth(depth, 8)] * 2, 64)
    channel = depth_channel(depth, 8, 16)[None].repeat(2, 1, 1, 1)
    settings = SamplingSettings(steps=3, seed=2, scheduler=scheduler)
    noise = sampler.initial_noise(1, 64, 128, 0).repeat(2, 1, 1, 1)

    def generate(latents, tools):
        return sampler.generate(["a room"] * 2, (128, 64), settings, None, latents=latents,
                                control=channel, training_free=tools)[1]

    plain = generate(noise, None)
    synced = generate(noise, TrainingFree(canvas=canvas))
    # Unchanged up to float32 rounding of x_0 <-> eps at the noisiest step (1 / sqrt(alpha) ~ 15).
    assert torch.allclose(synced, plain, atol=1e-4, rtol=0)
    different = sampler.initial_noise(2, 64, 128, 1)
    apart = generate(different, None)
    together = generate(different, TrainingFree(canvas=canvas))
    assert spread(canvas, together) < 0.5 * spread(canvas, apart)


def spread(canvas, views):
    """How far the views' samples of the canvas lie from their blend (what synchronisation removes)."""
    blended, _, own = canvas.blend(views)
    return float((own - blended[canvas.splat_cell]).pow(2).sum(dim=1).mean())


def test_frames_between_keyframes_know_what_the_keyframes_showed():
    from backend.geometry.uv_atlas import ensure_uvs
    from backend.pipelines.between_frames import known_from_keyframes

    room = build_demo_room()
    mesh = ensure_uvs(room.mesh, 256, 2).mesh
    cameras = trajectory(72, width=128, height=64)[:3]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    keyframe_latents = torch.stack([torch.full((4, 8, 16), 2.0), torch.full((4, 8, 16), -1.0)])
    known = known_from_keyframes(keyframe_latents, [0, 2], [1], cameras, depths, mesh, 8)
    assert known.latents.shape == (1, 4, 8, 16) and known.mask.shape == (1, 1, 8, 16)
    seen = known.mask[0, 0] > 0
    assert seen.float().mean() > 0.5  # a frame between two close keyframes sees mostly known surface
    values = known.latents[0][:, seen]
    assert bool(((values >= -1.0 - 1e-5) & (values <= 2.0 + 1e-5)).all())  # blends of the keyframes' content
    assert torch.equal(known.latents[0][:, ~seen], torch.zeros_like(known.latents[0][:, ~seen]))
