"""Every base model path, with views generated alone, is its diffusers pipeline view for view.

Compared: the decoded images of the whole run (text encoding, guided DDIM loop, control input,
VAE decode) from the same starting latents, to 1e-4. SD 2 depth is an img2img pipeline in
diffusers; at strength 1 it starts from the given latents (captured from ``prepare_latents``),
exactly like text-to-image, so the comparison is at strength 1.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)

from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.models.base_adapter import SD2_DEPTH, TextConditioning
from backend.models.depth_control import depth_channel, depth_image
from backend.models.tiny_bases import tiny_base, tiny_controlnet_base
from backend.pipelines.keyframes import KeyframePipeline
from backend.pipelines.panorama import PanoramaPipeline
from backend.pipelines.sampling import MultiViewSampler, SamplingSettings
from backend.scenes.demo_room import build_demo_room, trajectory

STEPS = 2
PROMPTS = ["a wooden table", "a red sofa", "a green cabinet"]


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(24, width=128, height=64)[:3]
    return cameras, [render_depth(room.mesh, camera) for camera in cameras]


def sampler_of(base) -> MultiViewSampler:
    return MultiViewSampler.from_adapter(base.adapter, base.vae, base.scheduler)


def start_latents(views: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(views, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def controlnet_reference(base):
    adapter = base.adapter
    parts = dict(vae=base.vae, unet=adapter.unet, controlnet=adapter.controlnet, scheduler=base.scheduler)
    if adapter.xl:
        return StableDiffusionXLControlNetPipeline(
            **parts, text_encoder=adapter.text_encoders[0], text_encoder_2=adapter.text_encoders[1],
            tokenizer=adapter.tokenizers[0], tokenizer_2=adapter.tokenizers[1], add_watermarker=False,
        )
    return StableDiffusionControlNetPipeline(
        **parts, text_encoder=adapter.text_encoders[0], tokenizer=adapter.tokenizers[0], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


@pytest.mark.parametrize("shape", ["sd15", "sd2", "sdxl"])
def test_controlnet_keyframes_alone_match_the_diffusers_controlnet_pipeline(scene, shape):
    cameras, depths = scene
    base = tiny_controlnet_base(shape)
    latents = start_latents(3, 64, 128)
    control = torch.stack([depth_image(d) for d in depths])
    # SDXL's convention: an empty negative prompt is zeros (force_zeros_for_empty_prompt), which
    # diffusers applies when no negative prompt is passed; SD 1.5/2 encode the empty text.
    negative = {} if shape == "sdxl" else {"negative_prompt": [""] * 3}
    expected = controlnet_reference(base)(
        PROMPTS, image=control, height=64, width=128, num_inference_steps=STEPS, guidance_scale=7.0,
        latents=latents.clone(), output_type="np", **negative,
    ).images
    settings = SamplingSettings(steps=STEPS, guidance_scale=7.0)
    ours = KeyframePipeline(sampler_of(base))(PROMPTS, cameras, depths, settings, latents=latents.clone(),
                                             output_float=True)
    assert ours.images.shape == expected.shape == (3, 64, 128, 3)
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)


def test_sd2_depth_adapter_matches_diffusers_depth2img_at_strength_one(scene):
    cameras, _ = scene
    base = tiny_base(SD2_DEPTH, "depth")
    # Depth constant over each latent cell, so the latent-size channel keeps the extremes -1 and 1
    # and Depth2Img's own min-max normalisation of it changes nothing.
    rng = np.random.default_rng(0)
    depths = [np.kron(rng.uniform(1.0, 5.0, (8, 16)), np.ones((8, 8))).astype(np.float32) for _ in cameras]
    channel = torch.stack([depth_channel(d, 8, 16) for d in depths])
    adapter = base.adapter
    reference = StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer, unet=adapter.model.unet,
        scheduler=base.scheduler, depth_estimator=None, feature_extractor=None,
    )
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
    # The geometry is not built for views handed no neighbours: each view attends only to itself.
    ours = KeyframePipeline(sampler_of(base))(
        PROMPTS, cameras, depths, SamplingSettings(steps=STEPS, guidance_scale=9.0),
        neighbours=[[], [], []], latents=captured["latents"], output_float=True,
    )
    np.testing.assert_allclose(ours.images, expected, atol=1e-4)


def test_depth_reaches_the_prediction_through_the_controlnet(scene):
    cameras, depths = scene
    sampler = sampler_of(tiny_controlnet_base("sd15"))
    settings = SamplingSettings(steps=STEPS, guidance_scale=1.0)
    latents = start_latents(1, 64, 128)
    near, far = (KeyframePipeline(sampler)(PROMPTS[:1], cameras[:1], [d], settings, latents=latents.clone(),
                                           output_float=True).images for d in (depths[0], depths[0][::-1].copy()))
    assert np.abs(near - far).max() > 1e-3


def test_sdxl_text_conditioning_carries_pooled_text_and_the_view_size():
    adapter = tiny_controlnet_base("sdxl", with_controlnet=False).adapter
    text, negative = adapter.encode_prompts(["a lamp", "a rug"], ["", ""], (128, 64))
    assert text.pooled.shape == (2, 48) and text.embeds.shape == (2, 77, 32 + 48)  # pooled: the second encoder
    assert text.time_ids.tolist() == [[64, 128, 0, 0, 64, 128]] * 2
    assert not negative.embeds.any() and not negative.pooled.any()  # SDXL's zeros for an empty negative prompt
    both = TextConditioning.cat([negative, text])
    assert [part.embeds.shape[0] for part in both.chunk(2)] == [2, 2]
    assert torch.equal(both.chunk(2)[1].pooled, text.pooled)


def test_text_to_image_base_without_controlnet_generates_panorama_views():
    sampler = sampler_of(tiny_base("sdxl_controlnet", "panorama"))
    assert sampler.model.task == "panorama" and not sampler.adapter.trained_multiview
    cameras = panorama_layout(size=64, ring_views=4, fov_deg=120.0, pole_views=False)
    result = PanoramaPipeline(sampler)("a beach", cameras, SamplingSettings(steps=STEPS, guidance_scale=5.0))
    assert result.images.shape == (4, 64, 64, 3)


@pytest.mark.parametrize("kind", ["sd2_depth", "sd15_controlnet"])
def test_attention_kwargs_reach_every_attention_processor_of_the_unet(kind):
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     views=None):
            seen.append(views)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    base = tiny_base(kind, "panorama")
    unet = base.adapter.unet if kind != SD2_DEPTH else base.adapter.model.unet
    unet.set_attn_processor(Recording())
    adapter = base.adapter
    text, _ = adapter.encode_prompts(["a lake"], None, (64, 64))
    adapter(start_latents(1, 64, 64).to(adapter.dtype), 500, text, None, attention_kwargs={"views": "geometry"})
    assert len(seen) == len(unet.attn_processors) and set(seen) == {"geometry"}
