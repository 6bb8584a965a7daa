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


def grid_from_level_coords(coords: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Level pixel coordinates (..., 2) as ``grid_sample`` coordinates (``align_corners=False``)."""
    grid = np.empty(coords.shape, np.float32)
    grid[..., 0] = (2.0 * coords[..., 0] + 1.0) / width - 1.0
    grid[..., 1] = (2.0 * coords[..., 1] + 1.0) / height - 1.0
    return torch.from_numpy(grid)


def _to_level(xy_full: np.ndarray, stride: int) -> np.ndarray:
    return (xy_full - (stride - 1) / 2.0) / stride


def depth_level_geometry(
    cameras: list[Camera],
    depths: list[np.ndarray],
    neighbours: list[list[int]],
    stride: int,
    tolerance: float = 0.05,
) -> LevelGeometry:
    """One token per neighbour at its depth correspondence; encodes the relative depth error.

    Views with fewer neighbours than the most connected one get unused, invalid slots.
    """
    _check_neighbours(neighbours, len(cameras))
    width, height = cameras[0].width // stride, cameras[0].height // stride
    slots = max(1, max(len(row) for row in neighbours))
    views, pixels = len(cameras), width * height
    source = np.zeros((views, slots), np.int64)
    coords = np.full((views, slots, pixels, 1, 2), -10.0)
    valid = np.zeros((views, pixels, slots), bool)
    error = np.zeros((views, pixels, slots, 1), np.float32)
    for i, row in enumerate(neighbours):
        for n, j in enumerate(row):
            corr = depth_correspondences(cameras[i], depths[i], cameras[j], depths[j], stride, tolerance)
            source[i, n] = j
            coords[i, n, :, 0] = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            valid[i, :, n] = corr.valid.reshape(-1)
            error[i, :, n, 0] = corr.depth_error.reshape(-1)
    return LevelGeometry(
        height, width, torch.from_numpy(source), grid_from_level_coords(coords, height, width),
        torch.from_numpy(valid), torch.from_numpy(error),
    )


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
    samples = len(offsets)
    slots = max(1, max(len(row) for row in neighbours))
    views, pixels = len(cameras), width * height
    source = np.zeros((views, slots), np.int64)
    coords = np.full((views, slots, pixels, samples, 2), -10.0)
    valid = np.zeros((views, pixels, slots * samples), bool)
    displacement = np.zeros((views, pixels, slots * samples, 2), np.float32)
    query = query_pixels(cameras[0].width, cameras[0].height, stride).reshape(-1, 2)
    for i, row in enumerate(neighbours):
        for n, j in enumerate(row):
            corr = rotation_correspondences(cameras[i], cameras[j], stride)
            centre = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            landed = corr.valid.reshape(-1)
            source[i, n] = j
            for k, offset in enumerate(offsets):
                t = n * samples + k
                level = centre + offset
                full = level * stride + (stride - 1) / 2.0
                inside = (full[:, 0] > -0.5) & (full[:, 0] < cameras[j].width - 0.5)
                inside &= (full[:, 1] > -0.5) & (full[:, 1] < cameras[j].height - 0.5)
                back = _rotate_pixels(cameras[j], cameras[i], full)
                coords[i, n, :, k] = level
                valid[i, :, t] = landed & inside & np.isfinite(back).all(axis=1)
                displacement[i, :, t] = np.where(valid[i, :, t, None], (back - query) / stride, 0.0)
    return LevelGeometry(
        height, width, torch.from_numpy(source), grid_from_level_coords(coords, height, width),
        torch.from_numpy(valid), torch.from_numpy(displacement),
    )


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
