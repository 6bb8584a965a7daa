import threading

import numpy as np
import pytest
import torch

from backend.geometry.cameras import Camera
from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.models.depth_control import depth_channel
from backend.models.mv_unet import MultiViewUNet
from backend.models.tiny import tiny_pipeline
from backend.pipelines.keyframes import KeyframePipeline
from backend.pipelines.panorama import PanoramaPipeline
from backend.pipelines.sampling import Cancelled, MultiViewSampler, SamplingSettings, preview
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError

STEPS = 4
PROMPTS = ["a wooden table", "a red sofa", "a green cabinet"]


def sampler_for(kind: str, task: str):
    pipe = tiny_pipeline(kind)
    model = MultiViewUNet(pipe.unet, task).eval()
    return pipe, MultiViewSampler(model, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(24, width=128, height=64)[:3]
    return cameras, [render_depth(room.mesh, camera) for camera in cameras]


def test_keyframes_with_zero_caa_match_diffusers_depth2img(scene):
    cameras, _ = scene
    reference, sampler = sampler_for("depth", "depth")
    settings = SamplingSettings(steps=STEPS, guidance_scale=9.0, seed=3)
    # Depth constant over each latent cell, so the latent-size channel keeps the extremes -1 and 1
    # and Depth2Img's own min-max normalisation of it changes nothing.
    rng = np.random.default_rng(0)
    depths = [np.kron(rng.uniform(1.0, 5.0, (8, 16)), np.ones((8, 8))).astype(np.float32) for _ in cameras]
    channel = torch.stack([depth_channel(d, 8, 16) for d in depths])
    assert channel.amin() == -1.0 and channel.amax() == 1.0
    captured = {}
    original = reference.prepare_latents

    def capture(*args, **kwargs):
        captured["latents"] = original(*args, **kwargs)
        return captured["latents"]

    reference.prepare_latents = capture
    expected = reference(
        PROMPTS, image=torch.zeros(3, 3, 64, 128), depth_map=channel[:, 0], strength=1.0,
        num_inference_steps=STEPS, guidance_scale=9.0, negative_prompt=[""] * 3,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    ours = KeyframePipeline(sampler)(PROMPTS, cameras, depths, settings, latents=captured["latents"],
                                     output_float=True)
    assert ours.images.shape == expected.shape == (3, 64, 128, 3)
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)


def test_text_panorama_with_zero_caa_matches_diffusers_stable_diffusion():
    reference, sampler = sampler_for("base", "panorama")
    cameras = panorama_layout(size=64, ring_views=4, fov_deg=120.0, pole_views=False)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a beach", "the sea", "a forest", "a mountain"]
    expected = reference(
        prompts, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.0, negative_prompt=[""] * 4,
        latents=latents.clone(), output_type="np",
    ).images
    ours = PanoramaPipeline(sampler)(prompts, cameras, SamplingSettings(steps=STEPS, guidance_scale=7.0),
                                     latents=latents.clone(), output_float=True)
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)


def test_one_seed_gives_reproducible_views_and_progress_reports_every_step(scene):
    cameras, depths = scene
    _, sampler = sampler_for("depth", "depth")
    pipeline = KeyframePipeline(sampler)
    steps = []
    first = pipeline("a room", cameras, depths, SamplingSettings(steps=STEPS, seed=5), progress=steps.append)
    second = pipeline("a room", cameras, depths, SamplingSettings(steps=STEPS, seed=5))
    other = pipeline("a room", cameras, depths, SamplingSettings(steps=STEPS, seed=6))
    assert first.images.dtype == np.uint8 and first.images.shape == (3, 64, 128, 3)
    assert np.array_equal(first.images, second.images)
    assert not np.array_equal(first.images, other.images)
    assert [s.step for s in steps] == list(range(1, STEPS + 1)) and steps[-1].total == STEPS
    assert steps[0].predicted.shape == (3, 4, 8, 16)
    shown = preview(sampler, steps[1], views=[2])
    assert shown.dtype == np.uint8 and shown.shape == (1, 64, 128, 3)
    # The last step's estimate is the result, up to DDIM's final alpha (SD 2's is 0.9991).
    assert np.abs(preview(sampler, steps[-1]).astype(int) - first.images).max() <= 3


def test_cancel_stops_within_one_step(scene):
    cameras, depths = scene
    _, sampler = sampler_for("depth", "depth")
    cancel = threading.Event()
    seen = []

    def progress(info):
        seen.append(info.step)
        if info.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        KeyframePipeline(sampler)("a room", cameras, depths, SamplingSettings(steps=10), progress=progress,
                                  cancel=cancel)
    assert seen == [1, 2]


def test_depth_channel_is_normalised_inverse_depth_with_invalid_marked():
    depth = np.array([[1.0, 2.0], [4.0, 0.0]], np.float32)
    channel = depth_channel(depth, 2, 2)[0].numpy()
    np.testing.assert_allclose(channel, [[1.0, (0.5 - 0.25) / 0.75 * 2 - 1], [-1.0, -2.0]], atol=1e-6)


def test_bad_requests_name_the_field(scene):
    cameras, depths = scene
    _, sampler = sampler_for("depth", "depth")
    pipeline = KeyframePipeline(sampler)
    with pytest.raises(InputError, match="prompts"):
        pipeline(["one", "two"], cameras, depths, SamplingSettings(steps=1))
    with pytest.raises(InputError, match="depths"):
        pipeline("a room", cameras, depths[:2], SamplingSettings(steps=1))
    with pytest.raises(InputError, match=r"depths\[1\]"):
        pipeline("a room", cameras, [depths[0], np.full_like(depths[1], np.nan), depths[2]], SamplingSettings(steps=1))
    with pytest.raises(InputError, match="steps"):
        pipeline("a room", cameras, depths, SamplingSettings(steps=0))
    with pytest.raises(InputError, match="model"):
        PanoramaPipeline(sampler)


def randomise(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def test_condition_branch_starts_as_nothing_and_then_conditions():
    pipe = tiny_pipeline("depth")
    model = MultiViewUNet(pipe.unet, "depth", with_condition=True).eval()
    sample, text = torch.randn(4, 5, 8, 16), torch.randn(4, 77, 32)
    condition = torch.randn(2, 5, 8, 16)
    with torch.no_grad():
        plain = model(sample, 10, text)
        assert torch.equal(model(sample, 10, text, condition=condition), plain)
        randomise(model.condition)
        conditioned = model(sample, 10, text, condition=condition)
        assert (conditioned - plain).abs().max() > 1e-3
        assert torch.equal(model(sample, 10, text), plain)  # no condition: the branch is bypassed


def test_interpolation_fills_every_window_and_keeps_keyframes(scene):
    from backend.geometry.keyframes import select_keyframes
    from backend.pipelines.interpolation import InterpolationPipeline

    room = build_demo_room()
    cameras = trajectory(24, width=128, height=64)[:7]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    overlap = np.clip(1.0 - np.abs(np.subtract.outer(np.arange(7), np.arange(7))) / 5.0, 0, 1)
    plan = select_keyframes(overlap, 0.3, 0.6)
    assert len(plan.windows) >= 2
    pipe = tiny_pipeline("depth")
    model = MultiViewUNet(pipe.unet, "depth", with_condition=True).eval()
    sampler = MultiViewSampler(model, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    keyframe_pipeline = KeyframePipeline(sampler)
    settings = SamplingSettings(steps=2)
    keys = keyframe_pipeline("a room", [cameras[k] for k in plan.keyframes], [depths[k] for k in plan.keyframes],
                             settings)
    keyframe_images = dict(zip(plan.keyframes, keys.images, strict=True))
    windows_seen = []
    result = InterpolationPipeline(keyframe_pipeline, max_in_between=1)(
        plan, keyframe_images, "a room", cameras, depths, settings,
        progress=lambda number, total, info: windows_seen.append((number, total)),
    )
    in_between = sorted(f for _, _, frames in plan.windows for f in frames)
    assert sorted(result.images) == in_between
    assert all(result.images[f].shape == (64, 128, 3) for f in in_between)
    batches = len(in_between)  # max_in_between=1: one batch per in-between frame
    assert {number for number, _ in windows_seen} == set(range(batches))
    with pytest.raises(InputError, match="keyframe_images"):
        InterpolationPipeline(keyframe_pipeline)(plan, {}, "a room", cameras, depths, settings)


def test_outpainting_with_zero_caa_matches_diffusers_inpainting():
    from backend.pipelines.outpaint import PanoramaOutpaintPipeline

    reference, sampler = sampler_for("inpaint", "panorama")
    cameras = panorama_layout(size=64, ring_views=4, fov_deg=120.0, pole_views=False)
    given = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    pipeline = PanoramaOutpaintPipeline(sampler)
    conditioning = pipeline.conditioning(given, 4, 64, 64)
    assert torch.equal(conditioning[:, 0, 0, 0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(4, 1, 64, 64)
    mask[0] = 0.0
    prompts = ["a harbour"] * 4
    expected = reference(
        prompts, image=torch.zeros(4, 3, 64, 64), mask_image=mask, masked_image_latents=conditioning[:, 1:],
        height=64, width=64, strength=1.0, num_inference_steps=STEPS, guidance_scale=9.0, negative_prompt=[""] * 4,
        latents=latents.clone(), output_type="np",
    ).images
    ours = pipeline(given, prompts, cameras, SamplingSettings(steps=STEPS), latents=latents.clone(),
                    conditioning=conditioning, output_float=True)
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)
    with pytest.raises(InputError, match="image"):
        pipeline(given[:32], prompts, cameras, SamplingSettings(steps=1))


def test_views_that_share_nothing_are_reported_and_still_generated(scene):
    cameras, depths = scene
    room = build_demo_room()
    # A fourth camera turned to look back the way the trajectory came: it shares no surface with the rest.
    behind = Camera(cameras[0].K, cameras[0].cam_to_world @ np.diag([-1.0, 1.0, -1.0, 1.0]),
                    cameras[0].width, cameras[0].height)
    views = [*cameras, behind]
    view_depths = [*depths, render_depth(room.mesh, behind)]
    _, sampler = sampler_for("depth", "depth")
    pipeline = KeyframePipeline(sampler)
    connected = pipeline("a room", cameras, depths, SamplingSettings(steps=1, seed=0))
    assert connected.isolated_views == []
    result = pipeline("a room", views, view_depths, SamplingSettings(steps=1, seed=0))
    assert result.isolated_views == [3]
    assert result.images.shape == (4, 64, 128, 3)


def test_guidance_halves_in_separate_calls_give_the_same_views(scene):
    cameras, depths = scene
    _, sampler = sampler_for("depth", "depth")
    pipeline = KeyframePipeline(sampler)
    together = pipeline("a room", cameras, depths, SamplingSettings(steps=2, seed=1), output_float=True)
    batches = []
    hook = sampler.model.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        apart = pipeline("a room", cameras, depths, SamplingSettings(steps=2, seed=1, split_guidance=True),
                         output_float=True)
    finally:
        hook.remove()
    assert batches == [len(cameras)] * 4  # two steps, one call per guidance half
    np.testing.assert_allclose(apart.images, together.images, atol=1e-5)


def test_released_weights_get_the_released_key_views(monkeypatch):
    from backend.models import caa_geometry
    from backend.models.released import use_released_behaviour
    from backend.pipelines import keyframes as keyframes_module
    from backend.pipelines.panorama import released_neighbours

    room = build_demo_room()
    cameras = trajectory(24, width=128, height=128)[:3]  # the released code needs every level 2 x 2 or more
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    _, sampler = sampler_for("depth", "depth")
    use_released_behaviour(sampler.model)
    built = []
    original = caa_geometry.depth_geometry

    def spy(*args, **kwargs):
        built.append((args[2], kwargs.get("released")))
        return original(*args, **kwargs)

    monkeypatch.setattr(keyframes_module, "depth_geometry", spy)
    result = KeyframePipeline(sampler)("a room", cameras, depths, SamplingSettings(steps=1, seed=0))
    assert result.images.shape == (3, 128, 128, 3)
    assert built == [(caa_geometry.released_depth_neighbours(cameras, depths), True)]

    ring = panorama_layout(size=64, pole_views=False)
    assert released_neighbours(ring) == caa_geometry.released_panorama_neighbours(8)
    with_poles = panorama_layout(size=64)
    assert released_neighbours(with_poles)[8]  # the top view reads the ring views it overlaps
