"""Released-behaviour geometry and condition add, checked against the reference's rules.

The ``reference_*`` functions restate mvdiffusion.md §4, §5, §6 and §17 one token at a time, in
plain float64 Python, independently of ``backend.models.caa_geometry``. Sample positions are
compared through what they read: the reference samples feature maps the released way
(``align_corners=True`` at ``x_img / key_scale - 0.5``), the geometry its own way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from released_reference import released_attention, released_pos_embedding

from backend.geometry.cameras import Camera, look_at, yaw_pitch_rotation
from backend.geometry.correspondence import overlap_matrix
from backend.geometry.panorama import panorama_layout
from backend.geometry.render import render_depth
from backend.models.caa_geometry import (
    depth_geometry,
    depth_level_geometry,
    panorama_geometry,
    panorama_level_geometry,
    released_depth_neighbours,
    released_depth_overlap,
    released_panorama_neighbours,
)
from backend.models.caa_tokens import LevelGeometry, ViewGroups
from backend.models.mv_unet import MultiViewUNet
from backend.models.released import ReleasedDepthEncoding, use_released_behaviour
from backend.models.tiny import tiny_unet
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError

MARGIN = 1e-3
"""Tokens whose released decision lies within this many pixels of a bound or a rounding tie are
left out of exact validity checks: there float32 and float64 arithmetic may decide differently."""


# -- the reference's rules, one token at a time -------------------------------------------------------------------
def matmul3(m: np.ndarray, v: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(float(m[r, 0] * v[0] + m[r, 1] * v[1] + m[r, 2] * v[2]) for r in range(3))


def reference_panorama_tokens(cameras: list[Camera], neighbours: list[list[int]], stride: int) -> list[list[dict]]:
    """§4 / §6.1 / §17.3. Per view, per neighbour: (P, 9) feature positions, validity, margins, displacements."""
    H, W = cameras[0].height, cameras[0].width
    h, w = H // stride, W // stride
    query_scale = H // h
    key_scale = W // h  # the released call hands the image width over as the key image height
    out = []
    for i, row in enumerate(neighbours):
        slots = []
        for j in row:
            ki, kj = cameras[i].K, cameras[j].K
            ri, rj = cameras[i].rotation, cameras[j].rotation
            forward = kj @ np.linalg.inv(rj) @ ri @ np.linalg.inv(ki)  # x_j ~ K_j R_j^-1 R_i K_i^-1 x_i
            backward = ki @ np.linalg.inv(ri) @ rj @ np.linalg.inv(kj)
            positions, valid, margin, displacement = [], [], [], []
            for py in range(h):
                for px in range(w):
                    qx, qy = px * query_scale + query_scale // 2, py * query_scale + query_scale // 2
                    p = matmul3(forward, (qx, qy, 1.0))
                    fx, fy = p[0] / p[2] / key_scale - 0.5, p[1] / p[2] / key_scale - 0.5
                    for dx in (-1, 0, 1):  # outer loop: x offset
                        for dy in (-1, 0, 1):
                            sx, sy = fx + dx, fy + dy
                            ix, iy = (sx + 0.5) * key_scale, (sy + 0.5) * key_scale
                            b = matmul3(backward, (ix, iy, 1.0))
                            positions.append((sx, sy))
                            valid.append(0 < ix < W and 0 < iy < H)
                            margin.append(min(abs(ix), abs(ix - W), abs(iy), abs(iy - H)))
                            displacement.append(((b[0] / b[2] - qx) / query_scale, (b[1] / b[2] - qy) / query_scale))
            slots.append({
                "source": j, "positions": np.array(positions).reshape(h * w, 9, 2),
                "valid": np.array(valid).reshape(h * w, 9), "margin": np.array(margin).reshape(h * w, 9),
                "values": np.array(displacement).reshape(h * w, 9, 2),
            })
        out.append(slots)
    return out


def reference_depth_tokens(
    cameras: list[Camera], depths: list[np.ndarray], neighbours: list[list[int]], stride: int
) -> list[list[dict]]:
    """§5 / §6.2. Per view, per neighbour: (P, 1) feature positions, validity, margins, encoded scalars."""
    H, W = cameras[0].height, cameras[0].width
    h, w = H // stride, W // stride
    scale = H // h  # query and key scale alike
    out = []
    for i, row in enumerate(neighbours):
        K = cameras[i].K
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        slots = []
        for j in row:
            relative = np.linalg.inv(cameras[j].cam_to_world) @ cameras[i].cam_to_world
            positions, valid, margin, values = [], [], [], []
            for py in range(h):
                for px in range(w):
                    qx, qy = px * scale + scale // 2, py * scale + scale // 2
                    d = float(depths[i][qy, qx])
                    if d == 0:
                        x, y = -1e6, -1e6
                    else:
                        camera_point = (d * (qx - cx) / fx, d * (qy - cy) / fy, d)
                        moved = [sum(relative[r, c] * camera_point[c] for c in range(3)) + relative[r, 3]
                                 for r in range(3)]
                        p = matmul3(cameras[j].K, tuple(moved))
                        x, y = p[0] / (p[2] + 1e-6), p[1] / (p[2] + 1e-6)
                    fx_, fy_ = x / scale - 0.5, y / scale - 0.5
                    full_x, full_y = (fx_ + 0.5) * scale, (fy_ + 0.5) * scale
                    rx, ry = round(full_x), round(full_y)  # half to even, as torch.round
                    inside = 0 <= rx < W and 0 <= ry < H
                    seen_depth = depths[j][min(max(ry, 0), H - 1), min(max(rx, 0), W - 1)]
                    neighbour_ok = inside and seen_depth > 0
                    if not neighbour_ok:
                        seen_depth = np.float32(1e6)
                    positions.append((fx_, fy_))
                    valid.append(neighbour_ok and d > 0)
                    ties = [abs(abs(v - math.floor(v)) - 0.5) for v in (full_x, full_y)]
                    bounds = [abs(full_x + 0.5), abs(full_x - W + 0.5), abs(full_y + 0.5), abs(full_y - H + 0.5)]
                    margin.append(min(ties + bounds))
                    values.append(abs(np.float32(depths[i][qy, qx]) - np.float32(seen_depth)))  # float32, as released
            slots.append({
                "source": j, "positions": np.array(positions).reshape(h * w, 1, 2),
                "valid": np.array(valid).reshape(h * w, 1), "margin": np.array(margin).reshape(h * w, 1),
                "values": np.array(values, np.float32).reshape(h * w, 1, 1),
            })
        out.append(slots)
    return out


def reference_samples(features: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """Bilinear reads at feature positions (P, S, 2) the released way: ``u / (w - 1) * 2 - 1``, align_corners=True."""
    _, h, w = features.shape
    grid = torch.from_numpy(positions).clone()
    grid[..., 0] = grid[..., 0] / (w - 1) * 2 - 1
    grid[..., 1] = grid[..., 1] / (h - 1) * 2 - 1
    return F.grid_sample(features[None], grid[None], align_corners=True)[0]  # (C, P, S)


def view_part(level: LevelGeometry | ViewGroups, view: int) -> tuple[LevelGeometry, int, list[int]]:
    """The geometry holding ``view``'s tokens, the view's index in it, and its slots' source views (global)."""
    if isinstance(level, ViewGroups):
        for part, owners in zip(level.parts, level.owners, strict=True):
            if view in owners.tolist():
                index = owners.tolist().index(view)
                return part, index, part.source_view[index].tolist()
        raise AssertionError(f"view {view} has no owner")
    return level, view, level.source_view[view].tolist()


def check_level(level, reference: list[list[dict]], features: torch.Tensor, inputs: int) -> None:
    """Every view's tokens: sources, slot count, what they sample, validity and encoded values."""
    decided = total = 0
    for view, slots in enumerate(reference):
        part, index, sources = view_part(level, view)
        samples = slots[0]["positions"].shape[1]
        assert part.grid.shape[1] == len(slots), "each view has exactly its own neighbours"
        assert sources == [slot["source"] for slot in slots]
        for n, slot in enumerate(slots):
            ours = F.grid_sample(
                features[sources[n]][None], part.grid[index, n][None].double(), align_corners=False
            )[0]
            torch.testing.assert_close(ours, reference_samples(features[slot["source"]], slot["positions"]),
                                       atol=1e-4, rtol=0)
            tokens = slice(n * samples, (n + 1) * samples)
            valid = part.valid[index, :, tokens].numpy()
            clear = slot["margin"] > MARGIN
            np.testing.assert_array_equal(valid[clear], slot["valid"][clear])
            decided, total = decided + clear.sum(), total + clear.size
            both = valid & slot["valid"]
            values = part.encoding_input[index, :, tokens].numpy()
            assert values.shape[-1] == inputs
            if inputs == 1:  # float32 depth differences: exact wherever both read the same pixel
                np.testing.assert_array_equal(values[clear], slot["values"][clear])
            else:
                np.testing.assert_allclose(values[both], slot["values"][both], atol=1e-4, rtol=0)
    assert decided >= 0.99 * total


def random_features(views: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(views, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- panorama ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [8, 16, 32, 64])
def test_panorama_tokens_follow_the_released_rules(stride):
    cameras = panorama_layout(size=128, pole_views=False)
    neighbours = released_panorama_neighbours(len(cameras))
    level = panorama_level_geometry(cameras, neighbours, stride, released=True)
    assert isinstance(level, LevelGeometry) and level.num_tokens == 18
    reference = reference_panorama_tokens(cameras, neighbours, stride)
    check_level(level, reference, random_features(8, level.height, level.width), inputs=2)


def test_panorama_key_scale_uses_the_image_width_as_released():
    """§17.3: for non-square views the key scale is width // level height, not the stride."""
    cameras = [
        Camera.from_fov(100.0, 128, 64, np.block([[yaw_pitch_rotation(90.0 * k, 0.0), np.zeros((3, 1))],
                                                  [np.zeros((1, 3)), np.ones((1, 1))]]))
        for k in range(4)
    ]
    neighbours = released_panorama_neighbours(4)
    geometry = panorama_geometry(cameras, neighbours, levels=3, released=True)
    for stride in (8, 16, 32):
        level = geometry[(64 // stride, 128 // stride)]
        reference = reference_panorama_tokens(cameras, neighbours, stride)
        check_level(level, reference, random_features(4, level.height, level.width, seed=stride), inputs=2)


def test_panorama_clean_mode_is_unchanged_by_the_option():
    cameras = panorama_layout(size=64, pole_views=False)
    neighbours = released_panorama_neighbours(len(cameras))
    clean, explicit = panorama_geometry(cameras, neighbours), panorama_geometry(cameras, neighbours, released=False)
    for key, level in clean.items():
        for name in ("source_view", "grid", "valid", "encoding_input"):
            assert torch.equal(getattr(level, name), getattr(explicit[key], name))


def test_released_panorama_neighbours_are_the_ring():
    assert released_panorama_neighbours(8)[0] == [7, 1]
    assert released_panorama_neighbours(8)[5] == [4, 6]
    assert released_panorama_neighbours(2) == [[1, 1], [0, 0]]
    with pytest.raises(InputError):
        released_panorama_neighbours(1)


# -- depth ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def depth_scene():
    room = build_demo_room()
    cameras = trajectory(24, width=256, height=128)[:6]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    # Holes in the depth: queries without depth and landings on pixels without depth.
    depths[1][40:80, 100:160] = 0.0
    depths[2][::7, ::5] = 0.0
    return cameras, depths


def reference_overlap(cameras: list[Camera], depths: list[np.ndarray]) -> np.ndarray:
    """§5 'Overlap mask' with §6.2's projection, vectorised over pixels only."""
    count, H, W = len(cameras), cameras[0].height, cameras[0].width
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    ratio = np.zeros((count, count))
    for i in range(count):
        K, d = cameras[i].K, depths[i].astype(np.float64)
        point = np.stack([d * (xs - K[0, 2]) / K[0, 0], d * (ys - K[1, 2]) / K[1, 1], d, np.ones_like(d)], -1)
        for j in range(count):
            moved = point @ (np.linalg.inv(cameras[j].cam_to_world) @ cameras[i].cam_to_world).T
            p = moved[..., :3] @ cameras[j].K.T
            with np.errstate(divide="ignore", invalid="ignore"):
                x, y = p[..., 0] / (p[..., 2] + 1e-6), p[..., 1] / (p[..., 2] + 1e-6)
            x[d == 0], y[d == 0] = -1e6, -1e6
            ratio[i, j] = ((x >= 0) & (x < W) & (y >= 0) & (y < H)).mean()
    return np.minimum(ratio, ratio.T)


def test_released_depth_neighbours_follow_the_overlap_rule(depth_scene):
    cameras, depths = depth_scene
    expected = reference_overlap(cameras, depths)
    np.testing.assert_allclose(released_depth_overlap(cameras, depths), expected, atol=1e-9)
    neighbours = released_depth_neighbours(cameras, depths)
    for i, row in enumerate(neighbours):
        listed = [j for j in range(len(cameras)) if j != i and expected[i, j] > 0.3]
        assert row == (listed or row)  # ascending, exactly those above 0.3 when there are any
    assert len({len(row) for row in neighbours}) > 1, "the scene should give views different neighbour counts"


def test_released_depth_neighbours_fall_back_to_adjacent_views():
    """Cameras side by side, 100 units apart, looking at their own wall: no overlaps anywhere."""
    cameras = [Camera.from_fov(60.0, 32, 16, look_at((100.0 * k, 0, 0), (100.0 * k, 1, 0))) for k in range(4)]
    depths = [np.full((16, 32), 2.0, np.float32)] * 4
    assert released_depth_overlap(cameras, depths)[np.triu_indices(4, 1)].max() == 0.0
    assert released_depth_neighbours(cameras, depths) == [[1], [0, 2], [1, 3], [2]]


def test_released_overlap_has_no_visibility_test():
    """Opposite views: points behind view j project (mirrored) into its image and count, as released."""
    cameras = [Camera.from_fov(90.0, 32, 32, look_at((0, 0, 0), target)) for target in ((0, 1, 0), (0, -1, 0))]
    depths = [np.full((32, 32), 3.0, np.float32)] * 2
    assert released_depth_overlap(cameras, depths)[0, 1] > 0.9
    assert overlap_matrix(cameras, depths)[0, 1] == 0.0  # the clean rule sees nothing shared


@pytest.mark.parametrize("stride", [8, 16, 32, 64])
def test_depth_tokens_follow_the_released_rules(depth_scene, stride):
    cameras, depths = depth_scene
    neighbours = released_depth_neighbours(cameras, depths)
    level = depth_level_geometry(cameras, depths, neighbours, stride, released=True)
    assert isinstance(level, ViewGroups)  # neighbour counts differ: one geometry per count
    reference = reference_depth_tokens(cameras, depths, neighbours, stride)
    check_level(level, reference, random_features(len(cameras), level.height, level.width), inputs=1)


def test_depth_tokens_of_equal_counts_form_one_level(depth_scene):
    cameras, depths = depth_scene
    neighbours = [[j for j in range(len(cameras)) if j != i][:2] for i in range(len(cameras))]
    geometry = depth_geometry(cameras, depths, neighbours, released=True)
    assert all(isinstance(level, LevelGeometry) for level in geometry.values())
    level = geometry[(8, 16)]
    check_level(level, reference_depth_tokens(cameras, depths, neighbours, 16),
                random_features(len(cameras), 8, 16), inputs=1)


def released_depth_attention(block, hidden: torch.Tensor, reference: list[list[dict]]) -> torch.Tensor:
    """§5's block per view, written out: each view's own keys, its own (P, n) scalars paired in memory order."""
    views, dim, h, w = hidden.shape
    pixels = h * w
    bands = block.encoding.freq_bands.double()
    out = torch.empty_like(hidden)
    for view, slots in enumerate(reference):
        keys = torch.stack([reference_samples(hidden[s["source"]], s["positions"])[:, :, 0].T for s in slots], 1)
        scalars = torch.from_numpy(np.stack([s["values"][:, 0] for s in slots], 1)).double()  # (P, n, 1)
        mask = torch.from_numpy(np.stack([s["valid"][:, 0] for s in slots], 1))
        x = hidden[view].reshape(dim, pixels).T[:, None]
        query_encoding = released_pos_embedding(torch.zeros(pixels, 1, 1, dtype=torch.float64), bands)
        x = released_attention(block, x, keys, mask, released_pos_embedding(scalars, bands), query_encoding)
        out[view] = x[:, 0].T.reshape(dim, h, w)
    return out


def test_grouped_depth_level_runs_each_view_as_released(depth_scene):
    """Different neighbour counts: every view attends over its own keys only, with its own pairing."""
    from backend.models.caa import CorrespondenceAttention

    cameras, depths = depth_scene
    neighbours = released_depth_neighbours(cameras, depths)
    stride, dim = 32, 64
    level = depth_level_geometry(cameras, depths, neighbours, stride, released=True).to("cpu", torch.float64)
    torch.manual_seed(0)
    block = CorrespondenceAttention(dim, 1).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    block.encoding, block.mask_invalid = ReleasedDepthEncoding(dim), False
    hidden = torch.randn(len(cameras), dim, level.height, level.width, dtype=torch.float64)
    reference = reference_depth_tokens(cameras, depths, neighbours, stride)
    # The geometry's grids are float32 (the released positions are float32 too); the float64
    # reference reads at the exact positions, which moves samples by ~1e-7 of their gradient.
    tolerance = {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        expected = released_depth_attention(block, hidden, reference)
        torch.testing.assert_close(block(hidden, level), expected, **tolerance)
        # Two samples (guidance halves) are handled view by view as well.
        torch.testing.assert_close(
            block(torch.cat([hidden, hidden]), level), torch.cat([expected, expected]), **tolerance
        )

    # One geometry padded with invalid slots to the longest row (the clean layout) is not it.
    views, pixels, slots = len(cameras), level.height * level.width, max(len(row) for row in neighbours)
    source = torch.zeros(views, slots, dtype=torch.long)
    grid = torch.full((views, slots, pixels, 1, 2), -2.0, dtype=torch.float64)
    valid = torch.zeros(views, pixels, slots, dtype=torch.bool)
    values = torch.zeros(views, pixels, slots, 1, dtype=torch.float64)
    for view in range(views):
        part, index, sources = view_part(level, view)
        count = len(sources)
        source[view, :count] = torch.tensor(sources)
        grid[view, :count] = part.grid[index]
        valid[view, :, :count] = part.valid[index]
        values[view, :, :count] = part.encoding_input[index]
    padded = LevelGeometry(level.height, level.width, source, grid, valid, values)
    with torch.no_grad():
        assert (block(hidden, padded) - expected).abs().max() > 1e-3


def test_released_geometry_rejects_what_the_release_cannot_run(depth_scene):
    cameras, depths = depth_scene
    with pytest.raises(InputError, match="at least one key view"):
        depth_level_geometry(cameras, depths, [[1]] + [[]] * 5, 8, released=True)
    with pytest.raises(InputError, match="divides by zero"):
        depth_level_geometry(cameras[:2], depths[:2], [[1], [0]], 128, released=True)
    with pytest.raises(InputError, match="3x3"):
        panorama_level_geometry(panorama_layout(64, pole_views=False), released_panorama_neighbours(8), 8, 5,
                                released=True)
    with pytest.raises(InputError, match="one size"):
        depth_level_geometry([cameras[0], cameras[1].scaled(0.5)], depths[:2], [[1], [0]], 8, released=True)


# -- the condition branch's in-place add ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conditioned_model():
    model = MultiViewUNet(tiny_unet("depth").eval(), "depth", with_condition=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in [*model.condition.parameters(), *model.caa_down.parameters(), *model.caa_mid.parameters()]:
            param.add_(torch.randn_like(param) * 0.2)
    return model


def run_recording(model: MultiViewUNet, inputs: tuple, geometry, replace: list | None = None):
    """The output and the skips each up block receives (cloned on arrival), optionally replacing them."""
    received, hooks = [], []
    for k, block in enumerate(model.unet.up_blocks):
        def hook(module, args, kwargs, k=k):
            received.append(tuple(t.clone() for t in kwargs["res_hidden_states_tuple"]))
            if replace is not None:
                return args, dict(kwargs, res_hidden_states_tuple=replace[k])
            return None

        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs[:3], geometry, inputs[3])
    finally:
        for hook in hooks:
            hook.remove()
    return out, received


def random_geometry(views: int) -> dict:
    generator = torch.Generator().manual_seed(5)
    out = {}
    for size in (8, 4, 2, 1):
        pixels = size * size
        out[(size, size)] = LevelGeometry(
            size, size, torch.tensor([[1], [0]]), torch.rand(views, 1, pixels, 1, 2, generator=generator) * 2 - 1,
            torch.rand(views, pixels, 1, generator=generator) < 0.7,
            torch.rand(views, pixels, 1, 1, generator=generator),
        )
    return out


@pytest.mark.parametrize("with_caa", [False, True])
def test_released_condition_add_also_lands_in_the_stored_skips(conditioned_model, with_caa):
    model, views = conditioned_model, 2
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2 * views, 5, 8, 8, generator=generator)  # two guidance halves
    text = torch.randn(2 * views, 4, 32, generator=generator)
    condition = torch.randn(views, 5, 8, 8, generator=generator)
    inputs = (sample, 10, text, condition)
    geometry = random_geometry(views) if with_caa else None

    model.released = False
    clean, clean_skips = run_recording(model, inputs, geometry)
    model.released = True
    try:
        released, released_skips = run_recording(model, inputs, geometry)
    finally:
        model.released = False

    # Skips in the order diffusers stored them: conv_in, then per down block its resnet output and
    # (blocks 0-2) its downsampler output; up blocks take them from the end.
    def stored(skips_per_up_block):
        return [t for block in reversed(skips_per_up_block) for t in block]

    with torch.no_grad():
        features = model.condition.features(condition)
        added = [encoder(features).repeat(2, 1, 1, 1) for encoder in model.condition.down]
        mid = model.condition.mid(features).repeat(2, 1, 1, 1)
    expected = stored(clean_skips)
    # The add before down block i lands on the tensor it starts from: conv_in's output, then the
    # previous downsampler's output. Before the mid block it lands on the last skip only when no
    # CAA block replaced the last down block's output.
    for index, extra in zip((0, 2, 4, 6), added, strict=True):
        expected[index] = expected[index] + extra
    if not with_caa:
        expected[7] = expected[7] + mid
    got = stored(released_skips)
    assert len(got) == len(expected) == 8
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), index

    # Nothing else differs: the clean model fed those skips gives the released output bit for bit.
    per_block = [tuple(t) for t in released_skips]
    manual, _ = run_recording(model, inputs, geometry, replace=per_block)
    assert torch.equal(manual, released)
    assert (released - clean).abs().max() > 1e-4


def test_clean_condition_add_leaves_the_skips_alone(conditioned_model):
    model, views = conditioned_model, 2
    generator = torch.Generator().manual_seed(1)
    sample, text = torch.randn(views, 5, 8, 8, generator=generator), torch.randn(views, 4, 32, generator=generator)
    condition = torch.randn(views, 5, 8, 8, generator=generator)
    conv_in = []
    hook = model.unet.conv_in.register_forward_hook(lambda module, args, output: conv_in.append(output.clone()))
    try:
        _, skips = run_recording(model, (sample, 10, text, condition), None)
    finally:
        hook.remove()
    assert not model.released
    assert torch.equal(skips[-1][0], conv_in[0])  # the last up block's first skip is conv_in's output, untouched


def test_use_released_behaviour_switches_the_in_place_add():
    model = MultiViewUNet(tiny_unet("depth").eval(), "depth", with_condition=True)
    assert model.released is False
    assert use_released_behaviour(model).released is True
    assert MultiViewUNet(tiny_unet("depth").eval(), "depth", released=True).released is True


def test_released_model_runs_on_grouped_released_geometry(depth_scene):
    cameras, depths = depth_scene
    model = use_released_behaviour(MultiViewUNet(tiny_unet("depth").eval(), "depth", with_condition=True))
    geometry = depth_geometry(cameras, depths, released_depth_neighbours(cameras, depths), released=True)
    geometry = {key: level.to("cpu", torch.float32) for key, level in geometry.items()}
    views = len(cameras)
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(views, 5, 16, 32, generator=generator)
    text = torch.randn(views, 4, 32, generator=generator)
    with torch.no_grad():
        out = model(sample, 10, text, geometry, torch.randn(views, 5, 16, 32, generator=generator))
    assert out.shape == (views, 4, 16, 32) and torch.isfinite(out).all()
