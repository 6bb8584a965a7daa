"""Pixel correspondences between views, from depth (scenes) or from pure rotations (panoramas).

For every query pixel of view i we store where it lands in view j and whether that landing is
trustworthy. The released MVDiffusion code recomputes this at full resolution inside every UNet
forward and has no occlusion test; here it depends only on cameras and depths, so it is computed
once per job, at the query pixels of each UNet level, with an occlusion test, and the relative
depth error is kept for the depth positional encoding.

Query pixels of a level with stride ``s`` are ``k * s + s // 2`` (the released code's choice).
Sampling grids use ``torch.nn.functional.grid_sample`` with ``align_corners=False``: a pixel
coordinate ``x`` of an image ``W`` wide maps to ``(2x + 1) / W - 1`` whatever the level's size,
so one pixel-space correspondence serves every stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import InputError, depth_map, in_range
from .cameras import Camera

UNET_STRIDES = (8, 16, 32, 64)
DEFAULT_DEPTH_TOLERANCE = 0.05


@dataclass(frozen=True)
class Correspondences:
    """Where the query pixels of view i land in view j.

    ``xy``: (h, w, 2) float32 pixel coordinates in view j (full resolution) for the (h, w) query
    grid of view i; ``valid``: (h, w) bool; ``depth_error``: (h, w) float32 signed relative error
    ``(z_reprojected - z_j) / z_j`` (0 where invalid), or None for rotation-only correspondences.
    """

    xy: np.ndarray
    valid: np.ndarray
    depth_error: np.ndarray | None = None

    @property
    def overlap(self) -> float:
        """Share of view i's query pixels with a valid landing in view j."""
        return float(self.valid.mean()) if self.valid.size else 0.0

    def sampling_grid(self, width: int, height: int) -> np.ndarray:
        """Normalised grid_sample coordinates (align_corners=False) in view j, invalid set to -2."""
        grid = np.empty(self.xy.shape, np.float32)
        grid[..., 0] = (2.0 * self.xy[..., 0] + 1.0) / width - 1.0
        grid[..., 1] = (2.0 * self.xy[..., 1] + 1.0) / height - 1.0
        grid[~self.valid] = -2.0
        return grid


def query_pixels(width: int, height: int, stride: int = 1) -> np.ndarray:
    """Pixel coordinates (h, w, 2) sampled by a UNet level of the given stride."""
    if stride < 1:
        raise InputError("stride", f"must be >= 1, got {stride}")
    if width % stride or height % stride:
        raise InputError("stride", f"image size {width}x{height} is not a multiple of {stride}")
    xs = np.arange(width // stride, dtype=np.float64) * stride + stride // 2
    ys = np.arange(height // stride, dtype=np.float64) * stride + stride // 2
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx, gy], axis=-1)


def inside(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel coordinates within the image (pixel centres at integers, edges at -0.5)."""
    return (xy[..., 0] >= -0.5) & (xy[..., 0] <= width - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] <= height - 0.5)


def bilinear_sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample ``image`` (H, W, ...) at pixel coordinates ``xy`` (..., 2), clamping at the borders."""
    height, width = image.shape[:2]
    x = np.clip(xy[..., 0], 0.0, width - 1.0)
    y = np.clip(xy[..., 1], 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros_like(x, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros_like(y, np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = x - x0, y - y0
    if image.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
