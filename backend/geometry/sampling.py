"""Image sampling shared by every resampler in the project (warps, stitching, metrics).

One bilinear sampler with one pixel convention (centres at integer coordinates), so a
half-pixel slip cannot creep into one resampler and not the others.
"""

from __future__ import annotations

import numpy as np

from ..validation import InputError, as_array


def image_to_float(field: str, image: object) -> tuple[np.ndarray, bool]:
    """An (H, W) or (H, W, C) image as finite floats, uint8 scaled to [0, 1]; also whether it was uint8.

    Floats keep their own scale, so linear HDR values pass through untouched.
    """
    arr = as_array(field, image, dtype=None)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(field, f"expected an (H, W) or (H, W, C) image, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0), True
    if arr.dtype.kind != "f":
        raise InputError(field, f"must be uint8 or float, got dtype {arr.dtype}")
    return arr.astype(np.result_type(arr.dtype, np.float32), copy=False), False


def sample_bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray, wrap_x: bool = False) -> np.ndarray:
    """Bilinear samples of a float image at pixel coordinates (centres at integers).

    Rows clamp at the borders; columns clamp too unless ``wrap_x``, in which case column W - 1
    interpolates with column 0 (an equirect's longitude wrap). Weights take the image's dtype so
    float32 images are sampled in float32.
    """
    height, width = image.shape[:2]
    y = np.clip(y, 0.0, height - 1.0)
    y0 = np.minimum(np.floor(y).astype(np.intp), max(height - 2, 0))
    y1 = np.minimum(y0 + 1, height - 1)
    fy = (y - y0).astype(image.dtype, copy=False)
    if wrap_x:
        x_floor = np.floor(x)
        fx = (x - x_floor).astype(image.dtype, copy=False)
        x0 = x_floor.astype(np.intp) % width
        x1 = (x0 + 1) % width
    else:
        x = np.clip(x, 0.0, width - 1.0)
        x0 = np.minimum(np.floor(x).astype(np.intp), max(width - 2, 0))
        x1 = np.minimum(x0 + 1, width - 1)
        fx = (x - x0).astype(image.dtype, copy=False)
    if image.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    flat = image.reshape((height * width,) + image.shape[2:])
    row0, row1 = y0 * width, y1 * width
    a, b = np.take(flat, row0 + x0, axis=0), np.take(flat, row0 + x1, axis=0)
    c, d = np.take(flat, row1 + x0, axis=0), np.take(flat, row1 + x1, axis=0)
    top = a + (b - a) * fx
    return top + (c + (d - c) * fx - top) * fy
