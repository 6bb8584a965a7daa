"""Training-free multi-view self-attention: the pretrained layers, widened across views per call."""

import numpy as np
import pytest
import torch

from backend.geometry.correspondence import overlap_matrix
from backend.geometry.panorama import neighbour_views, panorama_layout
from backend.geometry.render import render_depth
from backend.models.tiny import tiny_unet
from backend.models.view_attention import MultiViewSelfAttention, ViewAttention, install_view_attention
from backend.models.view_attention_geometry import (
    depth_view_attention,
    nearest_neighbours,
    panorama_view_attention,
    unet_level_strides,
)
from backend.scenes.demo_room import build_demo_room, trajectory


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(24, width=128, height=64)[:4]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    return cameras, depths


def run(unet, sample, text, attention):
    kwargs = attention.kwargs() if attention is not None else None
    with torch.no_grad():
        return unet(sample, 500, text, cross_attention_kwargs=kwargs).sample


def test_processor_goes_on_self_attention_layers_only():
    unet = tiny_unet("base")
    install_view_attention(unet)
    processors = unet.attn_processors
    selfs = [name for name, p in processors.items() if isinstance(p, MultiViewSelfAttention)]
    assert selfs and all(name.endswith("attn1.processor") for name in selfs)
    assert len(selfs) == sum(name.endswith("attn1.processor") for name in processors)


@pytest.mark.parametrize("kind", ["correspondence", "views"])
def test_attention_restricted_to_each_view_is_the_plain_unet(kind):
    views = 3
    plain_unet = tiny_unet("base").eval()
    unet = tiny_unet("base").eval()
    install_view_attention(unet)
    torch.manual_seed(0)
    sample = torch.randn(2 * views, 4, 8, 16)
    text = torch.randn(2 * views, 7, 32)
    alone = ViewAttention(views, kind, {}, [[] for _ in range(views)])
    expected = run(plain_unet, sample, text, None)
    assert torch.allclose(run(unet, sample, text, alone), expected, atol=1e-5, rtol=0)
    assert torch.equal(run(unet, sample, text, None), expected)  # no argument: the default processor


def test_correspondence_attention_mixes_overlapping_views_only(scene):
    cameras, depths = scene
    unet = tiny_unet("depth").eval()
    install_view_attention(unet)
    strides = unet_level_strides(unet, cameras[0].width, cameras[0].height, 8)
    assert overlap_matrix(cameras, depths, stride=8)[0, 1] > 0.3
    neighbours = [[1], [0], [3], [2]]  # two pairs: nothing reaches views 2 and 3 from view 0
    attention = depth_view_attention(cameras, depths, neighbours, strides)
    torch.manual_seed(0)
    sample = torch.randn(len(cameras), 5, 8, 16)
    text = torch.randn(len(cameras), 7, 32)
    base = run(unet, sample, text, attention)
    assert not torch.allclose(base, run(unet, sample, text, None), atol=1e-4)
    changed = sample.clone()
    changed[0] += torch.randn_like(changed[0])
    after = run(unet, changed, text, attention)
    assert not torch.allclose(after[1], base[1], atol=1e-6)
    assert torch.equal(after[2:], base[2:])


def test_mvdream_views_option_and_panorama_geometry_run_on_every_level():
    cameras = panorama_layout(size=64)
    unet = tiny_unet("base").eval()
    install_view_attention(unet)
    strides = unet_level_strides(unet, 64, 64, 8)
    neighbours = neighbour_views(cameras)
    torch.manual_seed(0)
    sample = torch.randn(2 * len(cameras), 4, 8, 8)
    text = torch.randn(2 * len(cameras), 7, 32)
    plain = run(unet, sample, text, None)
    for kind in ("correspondence", "views"):
        attention = panorama_view_attention(cameras, neighbours, strides, kind=kind)
        out = run(unet, sample, text, attention)
        assert out.shape == plain.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, plain, atol=1e-4)
        # The two guidance halves never mix: changing one half leaves the other's outputs.
        other = sample.clone()
        other[: len(cameras)] += 1.0
        assert torch.equal(run(unet, other, text, attention)[len(cameras):], out[len(cameras):])


def test_neighbours_are_the_most_overlapping_views():
    overlap = np.array([[1.0, 0.5, 0.2, 0.0], [0.6, 1.0, 0.4, 0.1], [0.3, 0.4, 1.0, 0.9], [0.0, 0.1, 0.8, 1.0]])
    assert nearest_neighbours(overlap, limit=2) == [[1, 2], [0, 2], [3, 1], [2, 1]]
