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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..validation import InputError, depth_map, in_range
from .cameras import Camera, inside

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


def depth_correspondences(
    cam_i: Camera,
    depth_i: np.ndarray,
    cam_j: Camera,
    depth_j: np.ndarray,
    stride: int = 1,
    tolerance: float = DEFAULT_DEPTH_TOLERANCE,
) -> Correspondences:
    """Unproject view i's query pixels with their depth, project into j, test against j's depth.

    A landing is valid when it is inside j, both depths are valid (> 0), the point is in front
    of j, and its depth in j agrees with j's depth map at the nearest pixel within ``tolerance``
    (relative). The last test is the occlusion test the released code lacks: without it a wall
    seen through a table in view i would be matched to the table in view j.
    """
    depth_i = depth_map("depth_i", depth_i, cam_i.height, cam_i.width)
    depth_j = depth_map("depth_j", depth_j, cam_j.height, cam_j.width)
    tolerance = in_range("tolerance", tolerance, 0.0, 10.0)
    points, has_depth = _query_points(cam_i, depth_i, stride)
    xy, valid, error = _land(points, has_depth, cam_j, depth_j, tolerance)
    return Correspondences(xy.astype(np.float32), valid, error.astype(np.float32))


def overlap_matrix(
    cameras: list[Camera],
    depths: list[np.ndarray],
    stride: int = 4,
    tolerance: float = DEFAULT_DEPTH_TOLERANCE,
    *,
    check: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """O[i, j]: share of view i's valid-depth pixels that land validly in view j (O[i, i] = 1).

    Evaluated on a ``stride`` grid: overlap ratios are smooth, and a 4x coarser grid makes the
    N^2 pairs of a long trajectory 16x cheaper without changing keyframe choices. Thousands of
    views still take hours, so ``check`` runs before every pair (raise to stop) and ``progress``
    gets (rows done, rows) after every row.
    """
    depths = _validated_depths(cameras, depths)
    tolerance = in_range("tolerance", tolerance, 0.0, 10.0)
    count = len(cameras)
    overlap = np.eye(count)
    for i in range(count):
        points, has_depth = _query_points(cameras[i], depths[i], stride)
        denominator = max(int(has_depth.sum()), 1)
        points, has_depth = points[has_depth], has_depth[has_depth]
        for j in range(count):
            if check is not None:
                check()
            if i != j:
                _, valid, _ = _land(points, has_depth, cameras[j], depths[j], tolerance)
                overlap[i, j] = valid.sum() / denominator
        if progress is not None:
            progress(i + 1, count)
    return overlap


def _validated_depths(cameras: list[Camera], depths: list[np.ndarray]) -> list[np.ndarray]:
    if not cameras:
        raise InputError("cameras", "need at least one camera")
    if len(cameras) != len(depths):
        raise InputError("depths", f"expected one depth map per camera ({len(cameras)}), got {len(depths)}")
    pairs = enumerate(zip(cameras, depths, strict=True))
    return [depth_map(f"depths[{k}]", depth, cam.height, cam.width) for k, (cam, depth) in pairs]


def _query_points(camera: Camera, depth: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """World points of the query pixels of one level, and which of them have a depth."""
    query = query_pixels(camera.width, camera.height, stride)
    z = depth[query[..., 1].astype(np.int64), query[..., 0].astype(np.int64)].astype(np.float64)
    return camera.unproject(z, query), z > 0


def _land(
    points: np.ndarray, has_depth: np.ndarray, camera: Camera, depth: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project points into a view and run the visibility and occlusion tests."""
    xy, z_reprojected = camera.project(points)
    landed = inside(xy, camera.width, camera.height) & has_depth & (z_reprojected > 0)
    col = np.clip(np.rint(xy[..., 0]), 0, camera.width - 1).astype(np.int64)
    row = np.clip(np.rint(xy[..., 1]), 0, camera.height - 1).astype(np.int64)
    z_seen = depth[row, col].astype(np.float64)
    landed &= z_seen > 0
    error = np.divide(z_reprojected - z_seen, z_seen, out=np.zeros_like(z_seen), where=z_seen > 0)
    valid = landed & (np.abs(error) <= tolerance)
    error[~valid] = 0.0
    return xy, valid, error


def level_correspondences(
    cameras: list[Camera],
    depths: list[np.ndarray],
    neighbours: list[list[int]],
    strides: tuple[int, ...] = UNET_STRIDES,
    tolerance: float = DEFAULT_DEPTH_TOLERANCE,
) -> dict[int, list[list[Correspondences]]]:
    """Correspondences from every view to each of its neighbours, for every UNet stride.

    ``result[stride][i][k]`` maps view i to view ``neighbours[i][k]``. This is the once-per-job
    precomputation the denoising loop reads from.
    """
    depths = _validated_depths(cameras, depths)
    if len(neighbours) != len(cameras):
        raise InputError("neighbours", f"expected one list per camera ({len(cameras)}), got {len(neighbours)}")
    for i, row in enumerate(neighbours):
        for j in row:
            if not 0 <= j < len(cameras) or j == i:
                raise InputError(f"neighbours[{i}]", f"invalid neighbour index {j}")
    return {
        stride: [
            [depth_correspondences(cameras[i], depths[i], cameras[j], depths[j], stride, tolerance) for j in row]
            for i, row in enumerate(neighbours)
        ]
        for stride in strides
    }
