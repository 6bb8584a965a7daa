"""Canvas synchronisation: views mapped onto one atlas or equirect, blended, and mapped back."""

import numpy as np
import pytest
import torch

from backend.geometry.canvas import canvas_size, equirect_canvas, latent_depth, mesh_canvas
from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.geometry.uv_atlas import ensure_uvs
from backend.scenes.demo_room import build_demo_room, trajectory


@pytest.fixture(scope="module")
def room_views():
    room = build_demo_room()
    mesh = ensure_uvs(room.mesh, 256, 2).mesh
    cameras = [c.scaled(1 / 8) for c in trajectory(24, width=128, height=64)[:4]]
    depths = [latent_depth(render_depth(room.mesh, c), 8) for c in trajectory(24, width=128, height=64)[:4]]
    return mesh, cameras, depths


def test_identical_views_are_left_unchanged(room_views):
    mesh, cameras, depths = room_views
    same = [cameras[1]] * 3
    canvas = mesh_canvas(mesh, same, [depths[1]] * 3, 64)
    views = torch.randn(1, 4, 8, 16).repeat(3, 1, 1, 1)
    assert canvas.coverage().any()
    assert torch.allclose(canvas.synchronise(views), views, atol=1e-6, rtol=0)

    ring = panorama_layout(size=8)
    pano = equirect_canvas([ring[0]] * 2)
    views = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    assert torch.allclose(pano.synchronise(views), views, atol=1e-6, rtol=0)


def test_views_that_disagree_are_pulled_together_where_they_overlap(room_views):
    mesh, cameras, depths = room_views
    canvas = mesh_canvas(mesh, cameras, depths, canvas_size(cameras, depths, mesh))
    torch.manual_seed(0)
    views = torch.randn(len(cameras), 4, 8, 16)
    before = consistency_error(canvas, views)
    synced = canvas.synchronise(views)
    assert consistency_error(canvas, synced) < 0.5 * before
    outside = ~canvas.coverage()
    assert torch.equal(synced.permute(0, 2, 3, 1)[outside], views.permute(0, 2, 3, 1)[outside])


def test_panorama_canvas_covers_the_poles_and_ties_the_ring_together():
    cameras = panorama_layout(size=16)
    canvas = equirect_canvas(cameras)
    _, weight, _ = canvas.blend(torch.zeros(len(cameras), 4, 16, 16))
    rows = weight.view(-1, 2 * int(np.sqrt(canvas.cells / 2)))
    assert bool((rows[0] > 0).all()) and bool((rows[-1] > 0).all())  # both poles
    torch.manual_seed(0)
    views = torch.randn(len(cameras), 4, 16, 16)
    assert consistency_error(canvas, canvas.synchronise(views)) < 0.5 * consistency_error(canvas, views)


def consistency_error(canvas, views):
    """Weighted spread of the views' samples around their blend, over the canvas."""
    blended, _, own = canvas.blend(views)
    spread = (own - blended[canvas.splat_cell]).pow(2).sum(dim=1)
    return float((spread * canvas.splat_weight).sum() / canvas.splat_weight.sum())
