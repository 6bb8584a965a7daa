import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from backend.geometry.panorama import neighbour_views, panorama_layout
from backend.geometry.render import render_depth
from backend.models.caa_geometry import depth_geometry, panorama_geometry
from backend.models.mv_unet import MultiViewUNet
from backend.models.tiny import tiny_unet
from backend.scenes.demo_room import build_demo_room, trajectory


def sd2_like_unet(in_channels: int) -> UNet2DConditionModel:
    """SD 2's block structure at toy size (four levels, cross attention on the first three)."""
    return tiny_unet({4: "base", 5: "depth"}[in_channels]).eval()


@pytest.fixture(scope="module")
def panorama_setup():
    cameras = panorama_layout(size=64)
    geometry = panorama_geometry(cameras, neighbour_views(cameras))
    return cameras, geometry


@pytest.fixture(scope="module")
def depth_setup():
    room = build_demo_room()
    cameras = trajectory(24, width=128, height=64)[:4]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    neighbours = [[j for j in range(4) if j != i] for i in range(4)]
    return cameras, depth_geometry(cameras, depths, neighbours)


def randomise(modules) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.2)


@pytest.mark.parametrize("task", ["panorama", "depth"])
def test_zero_initialised_blocks_give_the_plain_unet_view_for_view(task, panorama_setup, depth_setup):
    cameras, geometry = panorama_setup if task == "panorama" else depth_setup
    views = len(cameras)
    unet = sd2_like_unet(4 if task == "panorama" else 5)
    height, width = cameras[0].height // 8, cameras[0].width // 8
    sample = torch.randn(2 * views, unet.config.in_channels, height, width)  # two CFG halves
    text = torch.randn(2 * views, 7, 32)
    with torch.no_grad():
        plain = unet(sample, 500, text).sample
        model = MultiViewUNet(unet, task)
        multi = model(sample, 500, text, geometry)
    assert torch.equal(multi, plain)


@pytest.mark.parametrize("task", ["panorama", "depth"])
def test_trained_blocks_exchange_information_between_views_only(task, panorama_setup, depth_setup):
    cameras, geometry = panorama_setup if task == "panorama" else depth_setup
    views = len(cameras)
    unet = sd2_like_unet(4 if task == "panorama" else 5)
    model = MultiViewUNet(unet, task)
    randomise(model.added_modules().values())
    height, width = cameras[0].height // 8, cameras[0].width // 8
    sample = torch.randn(views, unet.config.in_channels, height, width)
    text = torch.randn(views, 7, 32)
    changed = sample.clone()
    changed[1] += 1.0
    with torch.no_grad():
        base, moved = model(sample, 500, text, geometry), model(changed, 500, text, geometry)
        plain_base, plain_moved = model(sample, 500, text), model(changed, 500, text)
    # Without geometry the views are independent; with it, changing view 1 reaches its neighbours.
    assert torch.equal(plain_base[0], plain_moved[0])
    assert (base[0] - moved[0]).abs().max() > 1e-4
    assert not torch.equal(base, plain_base)


def test_hooks_sit_before_every_resampler_and_at_the_last_blocks():
    unet = sd2_like_unet(4)
    model = MultiViewUNet(unet, "panorama")
    assert all(len(d.downsamplers[0]._forward_pre_hooks) == 1 for d in unet.down_blocks[:-1])
    assert len(unet.down_blocks[-1]._forward_hooks) == 1
    assert len(unet.mid_block.attentions[0]._forward_pre_hooks) == 1
    assert all(len(u.upsamplers[0]._forward_pre_hooks) == 1 for u in unet.up_blocks[:-1])
    assert len(unet.up_blocks[-1]._forward_hooks) == 1
    model.remove_hooks()
    assert not unet.up_blocks[-1]._forward_hooks


def test_missing_level_geometry_is_reported(panorama_setup):
    cameras, geometry = panorama_setup
    unet = sd2_like_unet(4)
    model = MultiViewUNet(unet, "panorama")
    partial = {key: value for key, value in geometry.items() if key != (1, 1)}
    with pytest.raises(ValueError, match="no CAA geometry"):
        model(torch.randn(len(cameras), 4, 8, 8), 10, torch.randn(len(cameras), 7, 32), partial)
    np.testing.assert_equal(sorted(geometry), [(1, 1), (2, 2), (4, 4), (8, 8)])


@pytest.mark.parametrize("task", ["panorama", "depth"])
def test_unet_benchmark_reports_overhead_memory_and_exactness(task):
    from backend.models.benchmark import run_unet_benchmark, sd2_structured_unet

    channels = (32, 32, 64, 64)
    result = run_unet_benchmark(task, views=3, channels=channels, neighbours=2, repeats=1, scaling=(3, 6))
    assert result["zero_caa_max_abs_diff"] == 0.0
    # With one repeat the overhead is the one pair's ratio of the two step times it reports.
    ratio = result["step_seconds_caa"] / result["step_seconds_plain"]
    assert result["caa_overhead"] == pytest.approx(ratio, rel=0.01)
    added = MultiViewUNet(sd2_structured_unet(channels, 4 if task == "panorama" else 5), task).added_state_dict()
    assert result["caa_parameters_m"] == round(sum(p.numel() for p in added.values()) / 1e6, 2)
    assert result["neighbours"] == 2 and result["batch"] == 6
    assert [row["views"] for row in result["scaling"]] == [3, 6]
    # Twice the views is twice the batch: a step's peak memory grows with it.
    assert result["scaling"][1]["peak_mem_mb_plain"] > 1.5 * result["scaling"][0]["peak_mem_mb_plain"]
    # The per-job geometry grows with the number of views at a fixed neighbour count.
    small, large = (row["geometry_mb"] for row in result["scaling"])
    assert 1.5 < large / small < 2.5


def test_a_unet_block_of_an_unknown_diffusers_stops_the_load_with_its_name():
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D

    unet = sd2_like_unet(4)

    class RenamedDownBlock(DownBlock2D):  # what a diffusers release restructuring its blocks looks like
        pass

    renamed = unet.down_blocks[3]
    renamed.__class__ = type("DownBlockV2", (torch.nn.Module,), {"forward": DownBlock2D.forward})
    with pytest.raises(TypeError, match=r"unet.down_blocks\[3\] is a DownBlockV2.*diffusers"):
        MultiViewUNet(unet, "panorama")
    assert not unet.down_blocks[3]._forward_hooks and not unet.down_blocks[0].downsamplers[0]._forward_pre_hooks
    renamed.__class__ = RenamedDownBlock  # a subclass keeps the structure the hooks rely on
    MultiViewUNet(unet, "panorama")
