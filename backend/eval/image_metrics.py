"""Per-image comparison metrics shared by the panorama and texturing evaluations."""

from __future__ import annotations

import numpy as np

from ..geometry.sampling import image_to_float
from ..validation import InputError, as_array


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB with a peak of 1, over the pixels ``mask`` selects.

    uint8 images are scaled to [0, 1] and float images are taken to be in [0, 1], so a uint8
    image and its float copy compare as identical. ``mask`` is (H, W), shared by all channels,
    or the images' full shape. Identical images give ``inf``.
    """
    a, _ = image_to_float("a", a)
    b, _ = image_to_float("b", b)
    if a.shape != b.shape:
        raise InputError("b", f"shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")
    error = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        mask = as_array("mask", mask, dtype=None)
        if mask.dtype != np.bool_:
            raise InputError("mask", f"must be boolean, got dtype {mask.dtype}")
        if mask.shape == a.shape[:2] and a.ndim == 3:
            mask = np.broadcast_to(mask[..., None], a.shape)
        if mask.shape != a.shape:
            raise InputError("mask", f"expected shape {a.shape[:2]} or {a.shape}, got {tuple(mask.shape)}")
        error = error[mask]
    if error.size == 0:
        raise InputError("mask", "selects no pixels")
    mse = float(error.mean())
    return float("inf") if mse == 0.0 else float(-10.0 * np.log10(mse))
