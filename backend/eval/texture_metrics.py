"""Texture quality without any learned model: coverage and re-rendered PSNR at held-out poses."""

from __future__ import annotations

import numpy as np

from ..geometry.cameras import Camera
from ..geometry.mesh import Mesh
from ..geometry.render import render_textured
from ..validation import InputError
from .image_metrics import psnr


def texture_coverage(seen: np.ndarray, visible: np.ndarray) -> float:
    """Share of ``visible`` texels (seen by any camera) that the bake saw, in [0, 1]."""
    seen, visible = np.asarray(seen, bool), np.asarray(visible, bool)
    if seen.shape != visible.shape:
        raise InputError("seen", f"shape {seen.shape} differs from visible {visible.shape}")
    total = int(visible.sum())
    return float((seen & visible).sum() / total) if total else 1.0


def heldout_psnr(
    mesh: Mesh, texture: np.ndarray, cameras: list[Camera], references: list[np.ndarray]
) -> tuple[float, list[float]]:
    """PSNR of the texture rendered at ``cameras`` against reference images of the same poses.

    Pixels that see no geometry are left out. Returns the PSNR of all those pixels pooled
    (one mean squared error over every view) and the per-view values.
    """
    if len(cameras) != len(references):
        raise InputError("references", f"expected one image per camera ({len(cameras)}), got {len(references)}")
    squared, count, per_view = 0.0, 0, []
    for camera, reference in zip(cameras, references, strict=True):
        rendered = render_textured(mesh, texture, camera)
        hit = rendered.triangle >= 0
        per_view.append(psnr(rendered.image, reference, hit))
        diff = rendered.image[hit].astype(np.float64) - np.asarray(reference)[hit].astype(np.float64)
        squared += float(np.square(diff / 255.0).sum())
        count += diff.size
    if count == 0:
        raise InputError("cameras", "no held-out camera sees any geometry")
    mse = squared / count
    return (float("inf") if mse == 0 else float(-10.0 * np.log10(mse))), per_view
