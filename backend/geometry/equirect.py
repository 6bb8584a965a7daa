"""Equirectangular maps in Cycles' convention, and resampling between them and perspective views.

Convention (Blender world axes, Z up; the same mapping Cycles uses for World textures, so a
panorama written here lands on the World background without any flip or offset):

* ``u = 0.5 - atan2(y, x) / 2pi``, ``v = 1 - acos(z) / pi``: the image centre faces +X, u = 0.25
  faces +Y, and u grows to the right as a camera turns right (positive yaw).
* Row 0 is the top (v = 1, +Z). Pixel (row, col) has its centre at
  ``u = (col + 0.5) / W``, ``v = 1 - (row + 0.5) / H``; widths are twice the heights.

Sampling wraps horizontally, so u = 0 and u = 1 are neighbours and no seam appears there by
construction; vertically it clamps at the first and last rows, which lie half a row from the poles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..validation import InputError, as_array, positive_int
from .cameras import Camera, inside, pinhole
from .sampling import image_to_float, sample_bilinear

DEFAULT_FEATHER = 2.0


def equirect_directions(height: int, width: int) -> np.ndarray:
    """World unit directions (H, W, 3) through the pixel centres of an equirect."""
    height = positive_int("height", height)
    width = positive_int("width", width)
    polar = np.pi * (np.arange(height) + 0.5) / height
    longitude = np.pi * (1.0 - 2.0 * (np.arange(width) + 0.5) / width)
    sin_polar = np.sin(polar)[:, None]
    out = np.empty((height, width, 3))
    out[..., 0] = sin_polar * np.cos(longitude)[None, :]
    out[..., 1] = sin_polar * np.sin(longitude)[None, :]
    out[..., 2] = np.cos(polar)[:, None]
    return out


def direction_to_equirect_uv(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) in [0, 1] of world directions (..., 3); directions need not be unit length."""
    dirs = as_array("dirs", dirs, dtype=None)
    if dirs.ndim < 1 or dirs.shape[-1] != 3:
        raise InputError("dirs", f"expected shape (..., 3), got {tuple(dirs.shape)}")
    dirs = dirs.astype(np.result_type(dirs.dtype, np.float32), copy=False)
    if dirs.size and np.linalg.norm(dirs, axis=-1).min() == 0.0:
        raise InputError("dirs", "contains a zero-length direction")
    return _uv(dirs)


def equirect_to_perspective(equirect: np.ndarray, camera: Camera) -> np.ndarray:
    """Render a perspective view of an equirect (H, 2H[, C]) seen from the camera's orientation.

    uint8 in gives uint8 out (rounded); float in gives the same float precision (at least
    float32), on the input's own scale.
    """
    if not isinstance(camera, Camera):
        raise InputError("camera", f"must be a Camera, got {type(camera).__name__}")
    pano, was_uint8 = image_to_float("equirect", equirect)
    _check_two_to_one("equirect", pano)
    x, y = equirect_pixel(camera.ray_directions(), pano.shape[0], pano.shape[1])
    view = sample_bilinear(pano, x, y, wrap_x=True)
    if was_uint8:
        return np.clip(np.rint(view * 255.0), 0, 255).astype(np.uint8)
    return view


def project_directions(camera: Camera, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (..., 2) of world directions in a camera, and whether the camera sees them.

    Only the camera's rotation matters (directions are points at infinity). Directions behind the
    camera get coordinates far outside the image.
    """
    cam = dirs @ camera.rotation.astype(dirs.dtype, copy=False)
    z = cam[..., 2]
    in_front = z > 1e-9
    safe_z = np.where(in_front, z, 1.0)
    x, y = pinhole(camera.K, cam[..., 0], cam[..., 1], safe_z)
    xy = np.stack([np.where(in_front, x, -1.0e6), np.where(in_front, y, -1.0e6)], axis=-1)
    return xy, in_front & inside(xy, camera.width, camera.height)


def border_weight(xy: np.ndarray, width: int, height: int, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """Blend weight of pixel positions: 1 at the image centre, falling to 0 at the image border.

    The weight is ``(r(x) * r(y)) ** feather`` with ``r`` a tent that is 0 on the outer pixel
    edges. Because every view's weight vanishes where its image ends, the blended panorama is
    continuous across view borders however much the views disagree; ``feather`` > 1 also makes
    the weight's slope vanish there, hiding the border's trace, and favours each view's centre.
    """
    rx = 1.0 - np.abs(2.0 * (xy[..., 0] + 0.5) / width - 1.0)
    ry = 1.0 - np.abs(2.0 * (xy[..., 1] + 0.5) / height - 1.0)
    return np.clip(rx * ry, 0.0, 1.0) ** feather


def stitch_equirect(
    images: Sequence[np.ndarray],
    cameras: Sequence[Camera],
    height: int = 1024,
    feather: float = DEFAULT_FEATHER,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend perspective views into an equirect (height, 2 * height, C) and its total blend weight.

    Every equirect pixel samples every view that sees it (bilinear) and takes the weighted mean
    with :func:`border_weight`. The output is float32 (H, W, C), or (H, W) for single-channel
    (H, W) views: uint8 views are scaled to [0, 1], float
    views keep their scale. Pixels no view sees are 0 with weight 0, so ``weight > 0`` is the
    coverage mask. Each equirect pixel is handled from its own direction, so the u = 0 / 1 wrap
    is an ordinary place in the sphere and gets no seam.
    """
    images = list(images)
    views, cameras = validated_views(images, cameras)
    height = positive_int("height", height)
    if not np.isfinite(feather) or feather <= 0:
        raise InputError("feather", f"must be a finite number > 0, got {feather!r}")
    width = 2 * height
    dirs = equirect_directions(height, width).astype(np.float32).reshape(-1, 3)
    channels = views[0].shape[2]
    total = np.zeros((dirs.shape[0], channels), np.float32)
    weight = np.zeros(dirs.shape[0], np.float32)
    for view, camera in zip(views, cameras, strict=True):
        xy, seen = project_directions(camera, dirs)
        index = np.flatnonzero(seen)
        xy = xy[index]
        w = border_weight(xy, camera.width, camera.height, feather).astype(np.float32)
        total[index] += w[:, None] * sample_bilinear(view, xy[:, 0], xy[:, 1])
        weight[index] += w
    covered = weight > 0
    total[covered] /= weight[covered, None]
    equirect = total.reshape(height, width, channels)
    if all(np.ndim(image) == 2 for image in images):
        equirect = equirect[..., 0]
    return equirect, weight.reshape(height, width)


def validated_views(images: Sequence[np.ndarray], cameras: Sequence[Camera]) -> tuple[list, list[Camera]]:
    """Float32 (H, W, C) views matching their cameras, one dtype kind and channel count for all."""
    images, cameras = list(images), list(cameras)
    if not images:
        raise InputError("images", "need at least one view")
    if len(cameras) != len(images):
        raise InputError("cameras", f"expected one camera per image ({len(images)}), got {len(cameras)}")
    views, kinds = [], set()
    for k, (image, camera) in enumerate(zip(images, cameras, strict=True)):
        if not isinstance(camera, Camera):
            raise InputError(f"cameras[{k}]", f"must be a Camera, got {type(camera).__name__}")
        view, was_uint8 = image_to_float(f"images[{k}]", image)
        if view.shape[:2] != (camera.height, camera.width):
            raise InputError(
                f"images[{k}]", f"is {view.shape[1]}x{view.shape[0]}, its camera is {camera.width}x{camera.height}"
            )
        view = view[..., None] if view.ndim == 2 else view
        if views and view.shape[2] != views[0].shape[2]:
            raise InputError(f"images[{k}]", f"has {view.shape[2]} channels, images[0] has {views[0].shape[2]}")
        kinds.add(was_uint8)
        views.append(view.astype(np.float32, copy=False))
    if len(kinds) > 1:
        raise InputError("images", "mixes uint8 and float views; convert them to one scale first")
    return views, cameras


def _check_two_to_one(field: str, image: np.ndarray) -> None:
    if image.shape[1] != 2 * image.shape[0]:
        raise InputError(field, f"an equirect must be twice as wide as high, got {image.shape[1]}x{image.shape[0]}")


def _uv(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.linalg.norm(dirs, axis=-1)
    u = np.mod(0.5 - np.arctan2(dirs[..., 1], dirs[..., 0]) / (2.0 * np.pi), 1.0)
    v = 1.0 - np.arccos(np.clip(dirs[..., 2] / norm, -1.0, 1.0)) / np.pi
    return u, v


def equirect_pixel(dirs: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (x, y) pixel coordinates of directions in an equirect (pixel centres at integers)."""
    u, v = _uv(dirs)
    return u * width - 0.5, (1.0 - v) * height - 0.5


def nearest_equirect_pixel(dirs: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) int64 of the equirect pixel whose area holds each direction (columns wrap around)."""
    x, y = equirect_pixel(dirs, height, width)
    rows = np.clip(np.floor(y + 0.5), 0, height - 1).astype(np.int64)
    return rows, np.mod(np.floor(x + 0.5), width).astype(np.int64)
