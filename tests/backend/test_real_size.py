"""Stable Diffusion 2 at its real widths, on the CPU: folders, loading, one step of every pipeline.

Everything else runs on tiny models; this builds SD 2-depth and SD 2-base with random weights
(:mod:`backend.models.sd2_configs`), loads them through ``ModelSet`` as a user's models folder
would be, and runs one denoising step of the keyframe, interpolation and panorama pipelines on
the smallest images that still give every UNet level 2 x 2 features (128 x 128: latents 16 x 16,
levels 16, 8, 4, 2). The folders' CAA blocks and condition branch have random, non-zero weights,
so each added block really changes what it is given. Then a released-layout MVDiffusion
checkpoint at SD 2 widths must load completely into both designs.

One model is in memory at a time (6.5 GB in float32; the process peaks at 7.6 GB); the folders
take 5.0 GB of disk and are deleted afterwards.
"""

import gc
import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import released_state
import torch
from safetensors import safe_open

from backend.engine import ModelConfig, ModelSet
from backend.geometry.keyframes import KeyframePlan
from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.models.mv_unet import MultiViewUNet, level_sizes
from backend.models.released import caa_blocks, component_state_dict, load_released_checkpoint
from backend.models.sd2_configs import (
    SD2_CHANNELS,
    empty_text_encoder,
    empty_unet,
    empty_vae,
    write_sd2_models,
)
from backend.models.tiny import write_tiny_models
from backend.pipelines.interpolation import InterpolationPipeline
from backend.pipelines.keyframes import KeyframePipeline
from backend.pipelines.panorama import PanoramaPipeline
from backend.pipelines.sampling import SamplingSettings
from backend.scenes.demo_room import build_demo_room, trajectory

pytestmark = pytest.mark.slow

SIZE = 128  # the smallest view whose innermost UNet level is still 2 x 2
LATENT = SIZE // 8
ONE_STEP = SamplingSettings(steps=1, guidance_scale=9.0, seed=0)
BLOCKS = [f"caa_down.{i}" for i in range(4)] + ["caa_mid"] + [f"caa_up.{i}" for i in range(4)]


@pytest.fixture(scope="module")
def sd2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    write_sd2_models(root, ("depth", "base"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def free_models():
    """Multi-view UNets reach themselves through their hooks: free a test's models before the next test."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(24, width=SIZE, height=SIZE)[:3]  # views 0 and 2 overlap as keyframes do (about 0.3)
    return cameras, [render_depth(room.mesh, camera) for camera in cameras]


@contextmanager
def loaded(root, task):
    """A ModelSet with the task's sampler loaded from ``root``, released on exit.

    Tests ask the ModelSet for the sampler rather than take it as a fixture: pytest keeps a test's
    fixture values until after the class fixtures' teardown, which would keep the model alive
    while the next one loads.
    """
    models = ModelSet(ModelConfig(root=str(root), device="cpu", dtype="float32", offline=True))
    models.sampler(task)
    try:
        yield models
    finally:
        models.release()


class CAAWatch:
    """Records, for every CAA block call, how far its output moved from its input and whether it is finite."""

    def __init__(self, model: MultiViewUNet):
        self.calls: list[tuple[str, float, bool]] = []
        self.handles = [block.register_forward_hook(self._hook(name)) for name, block in caa_blocks(model)]

    def _hook(self, name):
        def hook(module, args, output):
            change = float((output - args[0]).abs().max())
            self.calls.append((name, change, bool(torch.isfinite(output).all())))

        return hook

    def blocks(self) -> list[str]:
        return sorted({name for name, _, _ in self.calls})

    def assert_every_block_changed_its_input(self):
        assert self.blocks() == sorted(BLOCKS)
        assert all(finite for _, _, finite in self.calls)
        assert all(change > 1e-3 for _, change, _ in self.calls), [c for c in self.calls if c[1] <= 1e-3]

    def close(self):
        for handle in self.handles:
            handle.remove()


def check_loaded(sampler, folder, task, in_channels):
    unet = sampler.model.unet
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert torch.equal(unet.conv_in.weight, weights.get_tensor("conv_in.weight").float())  # the file's values
    assert tuple(unet.config.block_out_channels) == SD2_CHANNELS and unet.config.in_channels == in_channels
    assert level_sizes(unet, LATENT, LATENT) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    parts = {"unet": sampler.model, "vae": sampler.vae, "text_encoder": sampler.text_encoder}
    assert {name: next(part.parameters()).dtype for name, part in parts.items()} == dict.fromkeys(parts, torch.float32)
    assert sampler.text_encoder.config.hidden_size == 1024 and sampler.text_encoder.config.num_hidden_layers == 23
    assert sampler.model.task == task
    # The folder's caa.safetensors was loaded: the zero-initialised output layers are not zero any more.
    assert sampler.model.caa_up[3].attention.to_out.weight.abs().max() > 0
    assert (sampler.model.condition is not None) == (task == "depth")


def finite_images(images, views):
    assert images.shape == (views, SIZE, SIZE, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def test_folders_have_the_layout_diffusers_writes(sd2_root, tmp_path):
    tiny = write_tiny_models(tmp_path)
    for kind in ("depth", "base"):
        folder = sd2_root / kind
        index = json.loads((folder / "model_index.json").read_text())
        assert index == json.loads((tiny[kind] / "model_index.json").read_text())
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            files = [sorted(path.name for path in (where / part).iterdir()) for where in (folder, tiny[kind])]
            assert files[0] == files[1], part
        with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
            conv_in = weights.get_slice("conv_in.weight")
            assert conv_in.get_dtype() == "F16" and conv_in.get_shape() == [320, {"depth": 5, "base": 4}[kind], 3, 3]
    # SD 2's repositories share the VAE and text encoder; the folders share the files.
    shared = [sd2_root / kind / "text_encoder" / "model.safetensors" for kind in ("depth", "base")]
    assert shared[0].read_bytes()[:4096] == shared[1].read_bytes()[:4096]


# -- the depth model: keyframes and interpolation -------------------------------------------------------------------
class TestDepthModel:
    @pytest.fixture(scope="class")
    def models(self, sd2_root):
        with loaded(sd2_root, "depth") as models:
            yield models

    def test_loads_at_sd2_widths(self, models, sd2_root):
        check_loaded(models.sampler("depth"), sd2_root / "depth", "depth", 5)

    def test_one_keyframe_step_runs_every_caa_block(self, models, scene):
        sampler = models.sampler("depth")
        cameras, depths = scene
        calls = []
        capture = sampler.model.register_forward_hook(lambda module, args, output: calls.append((args, output)))
        watch = CAAWatch(sampler.model)
        try:
            result = KeyframePipeline(sampler)(
                "a living room", [cameras[0], cameras[2]], [depths[0], depths[2]], ONE_STEP,
                neighbours=[[1], [0]], output_float=True,
            )
            watch.assert_every_block_changed_its_input()
            (sample, timestep, text, geometry, condition), joint = calls[0]
            assert sample.shape == (4, 5, LATENT, LATENT) and geometry is not None  # both guidance halves
            watch.calls.clear()
            with torch.no_grad():
                alone = sampler.model(sample, timestep, text, None, condition)  # each view on its own
            assert watch.calls == []
        finally:
            watch.close()
            capture.remove()
        finite_images(result.images, 2)
        assert result.latents.shape == (2, 4, LATENT, LATENT) and torch.isfinite(result.latents).all()
        assert result.isolated_views == []  # the two views share correspondences
        assert torch.isfinite(joint).all() and (joint - alone).abs().max() > 1e-3

    def test_one_interpolation_step_uses_the_condition_branch(self, models, scene):
        sampler = models.sampler("depth")
        cameras, depths = scene
        plan = KeyframePlan(keyframes=[0, 2], windows=[(0, 2, [1])], pair_overlap=[0.3], weak_links=[])
        rng = np.random.default_rng(0)
        keyframe_images = {k: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for k in plan.keyframes}
        branch = sampler.model.condition
        encoded = []
        handles = [
            encoder.register_forward_hook(lambda module, args, output: encoded.append(float(output.abs().max())))
            for encoder in [*branch.down, branch.mid, *branch.up]
        ]
        watch = CAAWatch(sampler.model)
        try:
            result = InterpolationPipeline(KeyframePipeline(sampler))(
                plan, keyframe_images, "a living room", cameras, depths, ONE_STEP
            )
            watch.assert_every_block_changed_its_input()
        finally:
            watch.close()
            for handle in handles:
                handle.remove()
        assert sorted(result.images) == [1]
        image = result.images[1]
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert len(encoded) == 9 and all(np.isfinite(encoded)) and min(encoded) > 0


# -- the panorama model ---------------------------------------------------------------------------------------------
class TestPanoramaModel:
    @pytest.fixture(scope="class")
    def models(self, sd2_root):
        with loaded(sd2_root, "panorama") as models:
            yield models

    def test_loads_at_sd2_widths(self, models, sd2_root):
        check_loaded(models.sampler("panorama"), sd2_root / "base", "panorama", 4)

    def test_one_panorama_step_runs_every_caa_block(self, models):
        sampler = models.sampler("panorama")
        cameras = panorama_layout(size=SIZE, ring_views=3, fov_deg=130.0, pole_views=False)  # the fewest views
        watch = CAAWatch(sampler.model)
        try:
            result = PanoramaPipeline(sampler)("a mountain lake", cameras, ONE_STEP, output_float=True)
            watch.assert_every_block_changed_its_input()
        finally:
            watch.close()
        finite_images(result.images, 3)
        assert result.latents.shape == (3, 4, LATENT, LATENT) and torch.isfinite(result.latents).all()


# -- a released-layout checkpoint at SD 2 widths --------------------------------------------------------------------
def expanded(state):
    """Stand-ins without storage for the frozen VAE and text encoder tensors the release also saved."""
    return {key: torch.zeros((), dtype=torch.float16).expand(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("task", ["panorama", "depth"])
def test_released_checkpoint_loads_completely_at_sd2_widths(task):
    kind = {"panorama": "base", "depth": "depth"}[task]
    vae, text_encoder = empty_vae(), empty_text_encoder()
    state = released_state.make_released_state(
        task, empty_unet(kind), expanded(vae.state_dict()), expanded(text_encoder.state_dict()), dtype=torch.float16
    )
    # The model's UNet needs no values of its own: a complete load overwrites every tensor.
    model = MultiViewUNet(empty_unet(kind).half().to_empty(device="cpu"), task, with_condition=task == "depth")
    model = model.half()
    report = load_released_checkpoint(model, state)
    assert report.complete and report.design == task, report.summary()
    assert sorted(report.loaded) == sorted(model.state_dict())
    assert sorted(report.frequencies) == sorted(BLOCKS)
    assert len(report.skipped["vae"]) == len(vae.state_dict())
    assert len(report.skipped["text_encoder"]) == len(text_encoder.state_dict()) + 1
    assert "condition" not in report.skipped

    nest = "" if task == "panorama" else "attn1."
    pairs = {
        "unet.conv_in.weight": model.unet.conv_in.weight,
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight":
            model.unet.down_blocks[2].attentions[1].transformer_blocks[0].attn2.to_k.weight,
        "unet.mid_block.attentions.0.proj_in.weight": model.unet.mid_block.attentions[0].proj_in.weight,
        "unet.up_blocks.3.resnets.2.conv_shortcut.weight": model.unet.up_blocks[3].resnets[2].conv_shortcut.weight,
        f"cp_blocks_encoder.0.{nest}transformer.attn1.to_q.weight": model.caa_down[0].attention.to_q.weight,
        f"cp_blocks_encoder.2.{nest}transformer.ff.net.0.proj.weight": model.caa_down[2].attention.ff.proj.weight,
        f"cp_blocks_mid.{nest}transformer.norm2.bias": model.caa_mid.attention.norm2.bias,
        f"cp_blocks_decoder.1.{nest}transformer.ff.net.2.weight": model.caa_up[1].attention.ff.out.weight,
        f"cp_blocks_decoder.3.{nest}transformer.attn1.to_out.bias": model.caa_up[3].attention.to_out.bias,
    }
    if task == "depth":
        pairs.update({
            "cp_blocks_encoder.1.resnet.conv1.weight": model.caa_down[1].resnet.conv1.weight,
            "cp_blocks_mid.resnet.bn2.weight": model.caa_mid.resnet.norm2.weight,
            "cp_blocks_decoder.0.resnet.conv2.weight": model.caa_up[0].resnet.conv2.weight,
            "condition_conv_in.weight": model.condition.conv_in.weight,
            "condition_downblocks.2.conv1.weight": model.condition.down[2].conv1.weight,
            "condition_downblocks.3.conv2.weight": model.condition.mid.conv2.weight,  # the released mid quirk
            "condition_upblocks.0.conv1.weight": model.condition.up[0].conv1.weight,
        })
    for key, tensor in pairs.items():
        assert torch.equal(tensor, state["mv_base_model." + key]), key
    # SD 2's widths where the tiny model has none of its own: 1280-channel blocks, 1280 -> 640 up encoders.
    assert model.caa_mid.attention.to_q.weight.shape == (1280, 1280)
    if task == "depth":
        assert model.condition.up[3].conv1.weight.shape == (640, 320, 3, 3)

    # The frozen parts the release saved fit SD 2's VAE and text encoder under today's names.
    for part in (vae, text_encoder):
        renamed = component_state_dict(state, "vae" if part is vae else "text_encoder", part)
        assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in part.state_dict().items()}
