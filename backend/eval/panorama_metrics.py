"""Weight-free panorama metrics: the equirect wrap seam and MVDiffusion's overlap PSNR.

Both need only pixels and cameras, so they run in tests and benchmarks without any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..geometry.cameras import Camera
from ..geometry.equirect import validated_views
from ..geometry.panorama import rotation_correspondences
from ..geometry.sampling import image_to_float, sample_bilinear
from ..validation import InputError
from .image_metrics import psnr

DEFAULT_SEAM_BAND = 1 / 16
RING_PITCH_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SeamScore:
    """Wrap seam of an equirect.

    ``score = wrap_difference / neighbour_difference``: about 1 when the last and first columns
    differ as much as any two neighbouring columns near them do, well above 1 for a visible seam.
    ``wrap_difference`` is the mean absolute difference between the last and first columns
    (values on a [0, 1] scale); ``neighbour_difference`` the same mean over the neighbouring
    column pairs within the band on either side of the wrap.
    """

    score: float
    wrap_difference: float
    neighbour_difference: float


@dataclass(frozen=True)
class OverlapPSNR:
    """Mean PSNR (dB) over view pairs, and each pair's PSNR keyed by (i, j): view j warped into i."""

    mean: float
    per_pair: dict[tuple[int, int], float]


def seam_discontinuity(equirect: np.ndarray, band: float = DEFAULT_SEAM_BAND) -> SeamScore:
    """How much the equirect jumps at u = 0 / 1 compared with neighbouring columns near the wrap.

    The reference is local (``band`` of the width on each side of the wrap) rather than the whole
    image: a seamless panorama whose content near the wrap is busier or calmer than elsewhere
    should still score about 1. Differences are averaged over rows and channels. A constant
    neighbourhood gives ``score = 1`` when the wrap is constant too, ``inf`` otherwise.
    """
    image, _ = image_to_float("equirect", equirect)
    height, width = image.shape[:2]
    if width != 2 * height:
        raise InputError("equirect", f"an equirect must be twice as wide as high, got {width}x{height}")
    if not 0.0 < band <= 0.5:
        raise InputError("band", f"must lie in (0, 0.5], got {band!r}")
    image = image.astype(np.float64)
    if image.ndim == 2:
        image = image[..., None]
    columns = max(2, int(round(band * width)))
    wrap = float(np.abs(image[:, 0] - image[:, -1]).mean())
    left = np.abs(np.diff(image[:, :columns], axis=1)).mean()
    right = np.abs(np.diff(image[:, -columns:], axis=1)).mean()
    neighbour = float((left + right) / 2.0)
    if neighbour == 0.0:
        score = 1.0 if wrap == 0.0 else float("inf")
    else:
        score = wrap / neighbour
    return SeamScore(score, wrap, neighbour)


def ring_pairs(cameras: Sequence[Camera]) -> list[tuple[int, int]]:
    """Adjacent ring views (level views, in yaw order, closing the loop), each pair listed once."""
    ring = [k for k, cam in enumerate(cameras) if abs(cam.rotation[2, 2]) < RING_PITCH_TOLERANCE]
    if len(ring) < 2:
        return []
    yaw = [np.arctan2(-cameras[k].rotation[1, 2], cameras[k].rotation[0, 2]) % (2 * np.pi) for k in ring]
    ring = [k for _, k in sorted(zip(yaw, ring, strict=True))]
    pairs = [(ring[k], ring[(k + 1) % len(ring)]) for k in range(len(ring))]
    return pairs[:1] if len(ring) == 2 else pairs


def panorama_overlap_psnr(
    images: Sequence[np.ndarray],
    cameras: Sequence[Camera],
    pairs: Sequence[tuple[int, int]] | None = None,
) -> OverlapPSNR:
    """MVDiffusion's overlap PSNR: warp view j into view i by the rotation homography, compare.

    Default pairs are the adjacent ring views (:func:`ring_pairs`); pass pole pairs explicitly,
    e.g. from :func:`backend.geometry.panorama.neighbour_views`. The warp is bilinear, and only
    pixels whose landing has all four bilinear taps inside view j count, as in the reference
    protocol's mask of a warped all-ones image. Views are compared at their own resolution
    (the paper resizes to 1024 first); uint8 views are scaled to [0, 1].
    """
    views, cameras = validated_views(images, cameras)
    pairs = ring_pairs(cameras) if pairs is None else [tuple(pair) for pair in pairs]
    if not pairs:
        raise InputError("pairs", "no view pairs to compare (need at least two ring views or explicit pairs)")
    per_pair: dict[tuple[int, int], float] = {}
    for i, j in pairs:
        if not (0 <= i < len(views) and 0 <= j < len(views)) or i == j:
            raise InputError("pairs", f"({i}, {j}) must name two different views among {len(views)}")
        corr = rotation_correspondences(cameras[i], cameras[j])
        x, y = corr.xy[..., 0], corr.xy[..., 1]
        height_j, width_j = views[j].shape[:2]
        valid = corr.valid & (x >= 0) & (x <= width_j - 1) & (y >= 0) & (y <= height_j - 1)
        if not valid.any():
            raise InputError("pairs", f"views {i} and {j} do not overlap")
        warped = sample_bilinear(views[j], x, y)
        per_pair[(i, j)] = psnr(views[i], warped, valid)
    return OverlapPSNR(float(np.mean(list(per_pair.values()))), per_pair)
