"""Neighbour tokens for training-free multi-view attention, built once per job and latent size.

The same correspondences the trained CAA blocks read (:mod:`~backend.models.caa_geometry`: depth
correspondences with an occlusion test for scenes, rotation homographies for panoramas) give each
query the places in its neighbour views that show the same surface; here they become the key
tokens a pretrained self-attention layer reads there, a K x K neighbourhood around each landing.
Levels are the UNet's own (any number of them, any latent factor), keyed by token count, which
is all an attention processor sees of a feature map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..validation import InputError
from .caa_geometry import depth_level_geometry, panorama_level_geometry
from .caa_tokens import LevelGeometry
from .mv_unet import level_sizes
from .view_attention import AttentionKind, NeighbourTokens, ViewAttention

DEPTH_KERNEL = 1
"""K of the K x K cells read around each depth correspondence: the cell itself, as MVDiffusion's depth
design reads one token per neighbour (depth correspondences are exact and occlusion-tested; 3 x 3
costs nine times the tokens, see docs/benchmarks.md)."""
PANORAMA_KERNEL = 3
"""K around each rotation correspondence: MVDiffusion's panorama choice."""
DEFAULT_MAX_NEIGHBOURS = 4
"""Neighbour views each view reads: the most overlapping ones; more costs tokens for little gain."""
MIN_OVERLAP = 0.05
"""Share of a view a neighbour must see to be read at all."""


def nearest_neighbours(overlap: np.ndarray, limit: int = DEFAULT_MAX_NEIGHBOURS,
                       min_overlap: float = MIN_OVERLAP) -> list[list[int]]:
    """Each view's most overlapping views (symmetric overlap, largest first), at most ``limit``."""
    overlap = np.asarray(overlap, dtype=np.float64)
    shared = np.minimum(overlap, overlap.T)
    out = []
    for i in range(len(shared)):
        order = [int(j) for j in np.argsort(-shared[i], kind="stable") if j != i and shared[i, j] >= min_overlap]
        out.append(order[:limit])
    return out


def unet_level_strides(unet, width: int, height: int, latent_factor: int) -> list[int]:
    """Image-pixel stride of every level of ``unet`` for views of ``width`` x ``height``."""
    sizes = level_sizes(unet, height // latent_factor, width // latent_factor)
    strides = []
    for h, w in sizes:
        if height % h or width % w or height // h != width // w:
            raise InputError("cameras", f"views of {width}x{height} do not halve evenly down the UNet's levels")
        strides.append(height // h)
    return strides


def with_neighbourhood(level: LevelGeometry, kernel: int) -> LevelGeometry:
    """One token per slot widened to K x K tokens around it (level cells), each valid where the
    centre is valid and the offset sample lies inside the neighbour's map."""
    if kernel == 1:
        return level
    views, slots, pixels, _, _ = level.grid.shape
    steps = torch.arange(kernel, dtype=level.grid.dtype) - kernel // 2
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack([dx.reshape(-1) * 2.0 / level.width, dy.reshape(-1) * 2.0 / level.height], -1)
    grid = level.grid[:, :, :, :1] + offsets  # (V, N, P, K*K, 2)
    inside = (grid.abs() < 1.0).all(dim=-1)  # sample centre within the map
    centre = level.valid.view(views, pixels, slots).permute(0, 2, 1)  # (V, N, P)
    valid = (centre[..., None] & inside).permute(0, 2, 1, 3).reshape(views, pixels, -1)
    encoding = torch.zeros(views, pixels, valid.shape[-1], 1, dtype=level.encoding_input.dtype)
    return LevelGeometry(level.height, level.width, level.source_view, grid, valid, encoding)


def depth_view_attention(
    cameras: Sequence[Camera], depths: Sequence[np.ndarray], neighbours: list[list[int]], strides: Sequence[int],
    kernel: int = DEPTH_KERNEL, kind: AttentionKind = "correspondence",
) -> ViewAttention:
    """Attention geometry of a scene: depth correspondences (occlusion-tested) into each neighbour."""
    cameras, depths = list(cameras), list(depths)
    tokens = {}
    if kind == "correspondence" and any(neighbours):
        for stride in strides:
            level = depth_level_geometry(cameras, depths, neighbours, stride)
            tokens[level.height * level.width] = neighbour_tokens(with_neighbourhood(level, kernel))
    return ViewAttention(len(cameras), kind, tokens, neighbours)


def panorama_view_attention(
    cameras: Sequence[Camera], neighbours: list[list[int]], strides: Sequence[int],
    kernel: int = PANORAMA_KERNEL, kind: AttentionKind = "correspondence",
) -> ViewAttention:
    """Attention geometry of a panorama: rotation correspondences into each neighbour."""
    cameras = list(cameras)
    tokens = {}
    if kind == "correspondence" and any(neighbours):
        for stride in strides:
            level = panorama_level_geometry(cameras, neighbours, stride, kernel)
            tokens[level.height * level.width] = neighbour_tokens(level)
    return ViewAttention(len(cameras), kind, tokens, neighbours)


def neighbour_tokens(level: LevelGeometry) -> NeighbourTokens:
    """Each token as the neighbour cell its sample position falls in (valid tokens first, cut at the
    largest valid count): the neighbour's own token, read as one row."""
    views, slots, pixels, samples, _ = level.grid.shape
    grid = level.grid.permute(0, 2, 1, 3, 4).reshape(views, pixels, slots * samples, 2).double()
    x = torch.floor((grid[..., 0] + 1.0) * level.width / 2.0)  # the cell holding the sample (align_corners=False)
    y = torch.floor((grid[..., 1] + 1.0) * level.height / 2.0)
    inside = (x >= 0) & (x < level.width) & (y >= 0) & (y < level.height)
    source = level.source_view[:, None, :, None].expand(-1, pixels, -1, samples).reshape(views, pixels, -1)
    rows = (source * level.height + y.clamp(0, level.height - 1).long()) * level.width
    rows = rows + x.clamp(0, level.width - 1).long()
    valid = level.valid & inside
    kept = max(1, int(valid.sum(dim=-1).max()))
    order = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)[..., :kept]
    rows, valid = rows.gather(2, order), valid.gather(2, order)
    return NeighbourTokens(rows.reshape(views * pixels, kept), valid.reshape(views * pixels, kept))


def on_device(attention: ViewAttention, device: torch.device | str, dtype: torch.dtype) -> ViewAttention:
    """The same geometry on ``device`` (``dtype`` is the model's: the tokens are indices, it is not needed)."""
    moved = {count: tokens.to(device) for count, tokens in attention.tokens.items()}
    return ViewAttention(attention.views, attention.kind, moved, attention.neighbours, attention.max_views)
