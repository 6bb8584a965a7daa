"""Key-token geometry for CAA at every UNet level, built once per job from cameras and depths.

A UNet level of stride s has one feature cell per s x s block of pixels; cell k covers pixels
``[k s, (k + 1) s)`` so its centre is at pixel ``k s + (s - 1) / 2``. A full-resolution pixel
position ``x`` therefore sits at level coordinate ``(x - (s - 1) / 2) / s``; bilinear taps are
taken there (zero outside the image), which is ``grid_sample(align_corners=False)``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.correspondence import depth_correspondences, query_pixels
from ..geometry.panorama import rotation_correspondences
from ..validation import InputError
from .caa import LevelGeometry


def taps_from_level_coords(
    source_view: np.ndarray, coords: np.ndarray, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (flat indices and weights, (..., 4)) of level coordinates in source views.

    ``source_view`` (...,) says which view each sample reads; ``coords`` (..., 2) are (x, y) in
    level pixels. Taps outside the source image get weight 0 (and index 0).
    """
    x, y = coords[..., 0], coords[..., 1]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    indices, weights = [], []
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
        flat = source_view * (height * width) + np.clip(cy, 0, height - 1) * width + np.clip(cx, 0, width - 1)
        indices.append(np.where(inside, flat, 0).astype(np.int64))
        weights.append(np.where(inside, w, 0.0).astype(np.float32))
    return torch.from_numpy(np.stack(indices, -1)), torch.from_numpy(np.stack(weights, -1))


def _to_level(xy_full: np.ndarray, stride: int) -> np.ndarray:
    return (xy_full - (stride - 1) / 2.0) / stride


def depth_level_geometry(
    cameras: list[Camera],
    depths: list[np.ndarray],
    neighbours: list[list[int]],
    stride: int,
    tolerance: float = 0.05,
) -> LevelGeometry:
    """K = 1 tokens at the depth correspondences in each neighbour view; encodes the depth error.

    Views with fewer neighbours than the most connected one are padded with invalid tokens.
    """
    _check_neighbours(neighbours, len(cameras))
    width, height = cameras[0].width // stride, cameras[0].height // stride
    tokens = max(1, max(len(row) for row in neighbours))
    views, pixels = len(cameras), width * height
    source = np.zeros((views, pixels, tokens), np.int64)
    coords = np.full((views, pixels, tokens, 2), -10.0)
    valid = np.zeros((views, pixels, tokens), bool)
    error = np.zeros((views, pixels, tokens, 1), np.float32)
    for i, row in enumerate(neighbours):
        for t, j in enumerate(row):
            corr = depth_correspondences(cameras[i], depths[i], cameras[j], depths[j], stride, tolerance)
            source[i, :, t] = j
            coords[i, :, t] = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            valid[i, :, t] = corr.valid.reshape(-1)
            error[i, :, t, 0] = corr.depth_error.reshape(-1)
    index, weight = taps_from_level_coords(source, coords, height, width)
    return LevelGeometry(height, width, index, weight, torch.from_numpy(valid), torch.from_numpy(error))


def panorama_level_geometry(
    cameras: list[Camera], neighbours: list[list[int]], stride: int, kernel: int = 3
) -> LevelGeometry:
    """K x K tokens around the rotation correspondences; encodes each token's displacement.

    The displacement is where a token's sample lands back in the query view, minus the query
    pixel, in level pixels: about (0, 0) for the centre token and +-1 around it.
    """
    _check_neighbours(neighbours, len(cameras))
    if kernel < 1 or kernel % 2 == 0:
        raise InputError("kernel", f"must be a positive odd number, got {kernel}")
    width, height = cameras[0].width // stride, cameras[0].height // stride
    offsets = np.stack(np.meshgrid(np.arange(kernel) - kernel // 2, np.arange(kernel) - kernel // 2), -1)
    offsets = offsets.reshape(-1, 2).astype(np.float64)  # (K*K, 2) as (dx, dy), dy-major
    count = max(1, max(len(row) for row in neighbours)) * len(offsets)
    views, pixels = len(cameras), width * height
    source = np.zeros((views, pixels, count), np.int64)
    coords = np.full((views, pixels, count, 2), -10.0)
    valid = np.zeros((views, pixels, count), bool)
    displacement = np.zeros((views, pixels, count, 2), np.float32)
    query = query_pixels(cameras[0].width, cameras[0].height, stride).reshape(-1, 2)
    for i, row in enumerate(neighbours):
        for n, j in enumerate(row):
            corr = rotation_correspondences(cameras[i], cameras[j], stride)
            centre = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            landed = corr.valid.reshape(-1)
            for k, offset in enumerate(offsets):
                t = n * len(offsets) + k
                level = centre + offset
                full = level * stride + (stride - 1) / 2.0
                inside = (full[:, 0] > -0.5) & (full[:, 0] < cameras[j].width - 0.5)
                inside &= (full[:, 1] > -0.5) & (full[:, 1] < cameras[j].height - 0.5)
                back = _rotate_pixels(cameras[j], cameras[i], full)
                source[i, :, t], coords[i, :, t] = j, level
                valid[i, :, t] = landed & inside & np.isfinite(back).all(axis=1)
                shift = np.where(valid[i, :, t, None], (back - query) / stride, 0.0)
                displacement[i, :, t] = shift
    index, weight = taps_from_level_coords(source, coords, height, width)
    return LevelGeometry(height, width, index, weight, torch.from_numpy(valid), torch.from_numpy(displacement))


def _rotate_pixels(source: Camera, target: Camera, xy: np.ndarray) -> np.ndarray:
    """Pixels of ``source`` mapped into ``target`` by the rotation homography (NaN behind it)."""
    rays = source.ray_directions(xy)
    cam = rays @ target.rotation
    z = cam[:, 2]
    safe = np.where(z > 1e-9, z, np.nan)
    K = target.K
    return np.stack([K[0, 0] * cam[:, 0] / safe + K[0, 1] * cam[:, 1] / safe + K[0, 2],
                     K[1, 1] * cam[:, 1] / safe + K[1, 2]], -1)


def _check_neighbours(neighbours: list[list[int]], count: int) -> None:
    if len(neighbours) != count:
        raise InputError("neighbours", f"expected one list per view ({count}), got {len(neighbours)}")
    for i, row in enumerate(neighbours):
        for j in row:
            if not 0 <= j < count or j == i:
                raise InputError(f"neighbours[{i}]", f"invalid neighbour index {j}")


def unet_strides(levels: int = 4) -> list[int]:
    """Image-pixel strides of the UNet levels: the VAE's 8, then halved resolution per level."""
    return [8 * 2**k for k in range(levels)]


def depth_geometry(
    cameras: list[Camera], depths: list[np.ndarray], neighbours: list[list[int]], levels: int = 4,
    tolerance: float = 0.05,
) -> dict[tuple[int, int], LevelGeometry]:
    """Geometry for every UNet level of the depth task, keyed by the level's (h, w)."""
    out = {}
    for stride in unet_strides(levels):
        level = depth_level_geometry(cameras, depths, neighbours, stride, tolerance)
        out[(level.height, level.width)] = level
    return out


def panorama_geometry(
    cameras: list[Camera], neighbours: list[list[int]], levels: int = 4, kernel: int = 3
) -> dict[tuple[int, int], LevelGeometry]:
    """Geometry for every UNet level of a panorama, keyed by the level's (h, w)."""
    out = {}
    for stride in unet_strides(levels):
        level = panorama_level_geometry(cameras, neighbours, stride, kernel)
        out[(level.height, level.width)] = level
    return out
