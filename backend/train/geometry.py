"""CAA geometry for training samples: the same neighbours and correspondences the keyframe and
panorama pipelines build at inference, and several samples stacked into one multi-view batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry.cameras import Camera
from ..geometry.correspondence import overlap_matrix
from ..geometry.panorama import neighbour_views
from ..models.caa_geometry import OUTSIDE, depth_geometry, grid_from_level_coords, panorama_geometry
from ..models.caa_tokens import LevelGeometry, ViewGroups

NEIGHBOUR_THRESHOLD = 0.3  # KeyframePipeline's default overlap threshold
OVERLAP_STRIDE = 8  # the stride KeyframePipeline computes its overlap graph at


def trajectory_neighbours(
    cameras: Sequence[Camera], depths: Sequence[np.ndarray], threshold: float = NEIGHBOUR_THRESHOLD
) -> list[list[int]]:
    """Each view's CAA neighbours, by the rule :class:`~backend.pipelines.keyframes.KeyframePipeline`
    applies when it is given no neighbours: symmetric overlap (at stride 8) above ``threshold``."""
    views = len(cameras)
    if views < 2:
        return [[] for _ in range(views)]
    overlap = overlap_matrix(list(cameras), list(depths), stride=OVERLAP_STRIDE)
    overlap = np.minimum(overlap, overlap.T)
    return [[j for j in range(views) if j != i and overlap[i, j] > threshold] for i in range(views)]


def trajectory_geometry(
    cameras: Sequence[Camera], depths: Sequence[np.ndarray], threshold: float = NEIGHBOUR_THRESHOLD
) -> dict[tuple[int, int], LevelGeometry] | None:
    """The CAA geometry the keyframe pipeline builds for these views (None when no view has a neighbour)."""
    neighbours = trajectory_neighbours(cameras, depths, threshold)
    if not any(neighbours):
        return None
    return depth_geometry(list(cameras), list(depths), neighbours)


def panorama_sample_geometry(cameras: Sequence[Camera]) -> dict[tuple[int, int], LevelGeometry]:
    """The CAA geometry :class:`~backend.pipelines.panorama.PanoramaPipeline` builds for these views:
    rotation-only correspondences between the views of :func:`neighbour_views`."""
    cameras = list(cameras)
    return panorama_geometry(cameras, neighbour_views(cameras))


def sample_geometry(
    task: str, cameras: Sequence[Camera], depths: Sequence[np.ndarray] | None
) -> dict[tuple[int, int], LevelGeometry] | None:
    """A training sample's CAA geometry, as the task's pipeline builds it at inference."""
    if task == "panorama":
        return panorama_sample_geometry(cameras)
    return trajectory_geometry(cameras, list(depths))


def stack_geometry(
    parts: Sequence[dict[tuple[int, int], LevelGeometry] | None], views: Sequence[int]
) -> dict[tuple[int, int], LevelGeometry] | None:
    """One geometry for several trajectories run as one multi-view batch, none seeing another's views.

    ``parts[b]`` is trajectory b's geometry (None: no neighbours) and ``views[b]`` its view count.
    The result equals :func:`~backend.models.caa_geometry.depth_geometry` of all cameras with
    block-diagonal neighbour lists: slots are padded with unused, invalid ones as it pads them.
    """
    present = [p for p in parts if p is not None]
    if not present:
        return None
    out = {}
    for size in present[0]:
        height, width = size
        levels = [p[size] if p is not None else None for p in parts]
        if any(isinstance(level, ViewGroups) for level in levels):
            raise ValueError("released-behaviour geometry (ViewGroups) cannot be stacked")
        template = next(level for level in levels if level is not None)
        pixels = height * width
        slots = max(level.source_view.shape[1] for level in levels if level is not None)
        outside = grid_from_level_coords(np.full((1, 2), OUTSIDE), height, width)[0]
        source, grid, valid, encoding, offset = [], [], [], [], 0
        for level, count in zip(levels, views, strict=True):
            if level is None:
                level = _empty_level(height, width, count, template)
            pad = slots - level.source_view.shape[1]
            samples = level.grid.shape[3]
            src = F.pad(level.source_view, (0, pad)) + offset
            g = level.grid
            if pad:
                g = torch.cat([g, outside.expand(count, pad, pixels, samples, 2).to(g.dtype)], dim=1)
            source.append(src)
            grid.append(g)
            valid.append(F.pad(level.valid, (0, pad * samples)))
            encoding.append(F.pad(level.encoding_input, (0, 0, 0, pad * samples)))
            offset += count
        out[size] = LevelGeometry(
            height, width, torch.cat(source), torch.cat(grid), torch.cat(valid), torch.cat(encoding)
        )
    return out


def _empty_level(height: int, width: int, views: int, template: LevelGeometry) -> LevelGeometry:
    """A level for views without neighbours: one unused, invalid slot each (as depth_level_geometry makes)."""
    pixels, samples = height * width, template.grid.shape[3]
    coords = np.full((views, 1, pixels, samples, 2), OUTSIDE)
    return LevelGeometry(
        height, width, torch.zeros(views, 1, dtype=torch.long), grid_from_level_coords(coords, height, width),
        torch.zeros(views, pixels, samples, dtype=torch.bool),
        torch.zeros(views, pixels, samples, template.encoding_input.shape[-1]),
    )
