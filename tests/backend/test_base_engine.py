"""The engine, the jobs and the command line on SD 1.5 / SDXL ControlNet bases."""

import argparse
import json

import numpy as np
import pytest

from backend.cli_jobs import add_model_arguments, model_config
from backend.engine import ModelConfig, ModelSet
from backend.geometry.render import render_depth
from backend.models.tiny_bases import write_tiny_controlnet_base
from backend.pipelines.context import JobContext
from backend.pipelines.hdri import make_panorama, run_panorama_job
from backend.pipelines.sampling import MultiViewSampler
from backend.pipelines.texturing import run_texture_job
from backend.protocol import GenerationSettings, PanoramaJob, TextureJob, read_job
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError


def test_describe_names_kind_controlnet_and_native_size_without_loading():
    models = ModelSet(ModelConfig.tiny("sdxl_controlnet"))
    assert models.describe("depth") == {"base_model": "tiny", "multiview_weights": "none", "controlnet": "tiny",
                                        "base_kind": "sdxl_controlnet", "native_view_size": 1024}
    assert "controlnet" not in models.describe("panorama") and models.loaded() == {}
    defaults = ModelSet(ModelConfig(base_kind="sd15_controlnet")).describe("depth")
    assert defaults["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert defaults["controlnet"] == "lllyasviel/control_v11f1p_sd15_depth" and defaults["native_view_size"] == 512


def test_unknown_base_kind_names_the_field():
    with pytest.raises(InputError) as err:
        ModelSet(ModelConfig(base_kind="sd3")).describe("depth")
    assert err.value.field == "base_kind"


def test_one_model_serves_both_tasks_and_only_the_depth_task_loads_the_controlnet(tmp_path):
    model, controlnet = write_tiny_controlnet_base("sd15", tmp_path)
    config = ModelConfig(base_kind="sd15_controlnet", model=str(model), controlnet=str(controlnet), device="cpu",
                         dtype="float32", offline=True)
    models = ModelSet(config)
    panorama, depth = models.sampler("panorama"), models.sampler("depth")
    assert panorama.adapter.controlnet is None and depth.adapter.controlnet is not None
    assert panorama.adapter.unet is depth.adapter.unet and panorama.vae is depth.vae
    assert depth.base_kind == "sd15_controlnet" and depth.native_size == 512 and depth.view_multiple == 64


def test_texture_job_on_a_controlnet_base_generates_every_frame_and_reports_the_base(tmp_path):
    room = build_demo_room()
    cameras = trajectory(72, width=128, height=64)[:8]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    job = TextureJob(GenerationSettings(["a cosy living room"], steps=2, seed=1), cameras, depths, room.mesh, 128,
                     room.object_names)
    models = ModelSet(ModelConfig.tiny("sd15_controlnet"))
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path), models.describe("depth"))
    assert report["base_kind"] == "sd15_controlnet" and report["multiview_weights"] == "none"
    assert json.loads((tmp_path / "report.json").read_text())["controlnet"] == "tiny"
    assert (tmp_path / "texture.png").is_file()
    assert len(list((tmp_path / "frames").glob("*.png"))) == len(cameras)


def test_panorama_job_on_sdxl_reports_the_base(tmp_path):
    job = PanoramaJob(GenerationSettings("a meadow", steps=2), equirect_height=64, view_size=64)
    models = ModelSet(ModelConfig.tiny("sdxl_controlnet"))
    report = run_panorama_job(job, models.sampler("panorama"), JobContext(tmp_path), models.describe("panorama"))
    assert report["base_kind"] == "sdxl_controlnet" and report["view_size"] == 64 and report["native_view_size"] == 1024


def test_panorama_views_default_to_the_models_native_size(monkeypatch, tmp_path):
    job = read_job(PanoramaJob(GenerationSettings("a meadow", steps=1), equirect_height=64).to_bytes())
    assert job.view_size is None
    sampler = ModelSet(ModelConfig.tiny("sd15_controlnet")).sampler("panorama")
    monkeypatch.setattr(MultiViewSampler, "native_size", property(lambda self: 128))
    panorama = make_panorama(job, sampler, JobContext(tmp_path))
    assert panorama.cameras[0].width == 128 and np.asarray(panorama.views).shape[1] == 128


def parse(*argv: str) -> ModelConfig:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return model_config(parser.parse_args(list(argv)))


def test_command_line_chooses_the_base_kind_and_its_sources():
    assert parse("--models", "tiny", "--base-kind", "sdxl_controlnet") == ModelConfig.tiny("sdxl_controlnet")
    config = parse("--base-kind", "sd15_controlnet", "--model", "my.safetensors", "--model-config", "cfg",
                   "--controlnet", "me/depth-cn")
    assert (config.base_kind, config.model, config.model_config, config.controlnet) == (
        "sd15_controlnet", "my.safetensors", "cfg", "me/depth-cn")
    assert parse().base_kind == "sd2_depth"


def test_downloaded_copies_of_the_default_model_and_controlnet_are_used(tmp_path):
    from backend.models import catalog
    from backend.models.hub import allow_patterns, required_weights

    model, controlnet = write_tiny_controlnet_base("sdxl", tmp_path / "written")
    local_model = catalog.hub_folder(catalog.default_family_model("sdxl_controlnet"), tmp_path)
    local_controlnet = catalog.hub_folder(catalog.default_controlnet("sdxl_controlnet"), tmp_path)
    config = ModelConfig(base_kind="sdxl_controlnet", models_dir=str(tmp_path))
    assert config.source("depth") == catalog.default_family_model("sdxl_controlnet")
    local_model.parent.mkdir(parents=True)
    model.rename(local_model)
    controlnet.rename(local_controlnet)
    assert config.source("panorama") == str(local_model) and config.controlnet_source() == str(local_controlnet)
    # What a snapshot of each fetches and must hold: SDXL's second text encoder, the ControlNet's one file.
    assert "text_encoder_2/model" in required_weights(local_model) and required_weights(local_controlnet) == (
        "diffusion_pytorch_model",)
    patterns = allow_patterns()
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/*.json", "config.json"} <= set(patterns)
    assert not any(p.endswith((".ckpt", ".bin")) or "fp16" in p for p in patterns)
