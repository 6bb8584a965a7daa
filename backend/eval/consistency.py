"""Multi-view consistency of depth views: MVDiffusion's overlap PSNR and its ratio to ground truth.

Two views of one consistent texture show the same colour wherever they see the same surface
point, so warping one into the other through depth and measuring PSNR on the overlap tells how
consistent a set of generated views is. Raw PSNR also depends on the scene (resampling error,
texture detail), which is why the paper divides by the PSNR of ground-truth views of the same
poses under the same protocol (section 13 and Table 3 of the MVDiffusion notes).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..geometry.cameras import Camera
from ..geometry.correspondence import depth_correspondences
from ..geometry.sampling import sample_bilinear
from ..validation import InputError, depth_map, in_range, rgb_image
from .image_metrics import psnr

DEFAULT_MAX_DEPTH_ERROR = 0.5
# depth_correspondences only accepts relative tolerances up to 10; at that bound its own test keeps
# every landing whose reprojected depth is at most 11 times j's depth, so the absolute test applied
# afterwards is the one that decides for any threshold below ten times the nearest depth seen.
_LOOSEST_RELATIVE_TOLERANCE = 10.0
_LARGEST_DEPTH_ERROR = 1e9


@dataclass(frozen=True)
class OverlapScore:
    """Overlap PSNR of depth views, keyed by the pair (i, j): view j warped into view i.

    ``per_pair`` holds the PSNR (dB, peak 1) of every pair that has at least one valid pixel;
    ``valid_share`` holds, for every requested pair, the share of view i's pixels that were
    compared (0.0 for pairs that do not overlap, which are therefore absent from ``per_pair``
    but listed by :attr:`empty_pairs`). ``mean_psnr`` is the mean of ``per_pair`` (NaN when no
    pair could be scored); identical overlaps give ``inf``, as :func:`psnr` does.
    """

    mean_psnr: float
    per_pair: dict[tuple[int, int], float]
    valid_share: dict[tuple[int, int], float]

    @property
    def mean(self) -> float:
        """Alias of ``mean_psnr``, the name the panorama score uses, so both feed the same ratio."""
        return self.mean_psnr

    @property
    def empty_pairs(self) -> list[tuple[int, int]]:
        """Requested pairs with no valid pixel: reported so a failed overlap is never mistaken for a score."""
        return [pair for pair, share in self.valid_share.items() if share == 0.0]


def depth_overlap_psnr(
    images: Sequence[np.ndarray],
    cameras: Sequence[Camera],
    depths: Sequence[np.ndarray],
    pairs: Sequence[tuple[int, int]] | None = None,
    max_depth_error: float = DEFAULT_MAX_DEPTH_ERROR,
) -> OverlapScore:
    """Warp view j into view i through i's depth and measure PSNR where the two views agree on geometry.

    ``images`` are uint8 (H, W, 3) sRGB views, ``depths`` planar depth maps (0 where nothing was
    hit), one per camera. ``pairs`` default to consecutive views (i, i + 1), the paper's choice
    for depth views. A pixel of view i counts when it has a depth, its surface point lands inside
    view j in front of the camera, j has a depth at the nearest pixel of the landing, and the
    point's depth in j differs from that depth by at most ``max_depth_error`` scene units (0.5 m
    in the paper): the test drops pixels hidden in j, whose colours legitimately differ. View j
    is sampled bilinearly at the landing.
    """
    views, cameras, depths = _validated_inputs(images, cameras, depths)
    pairs = _validated_pairs(pairs, len(views))
    max_depth_error = in_range("max_depth_error", max_depth_error, 0.0, _LARGEST_DEPTH_ERROR)
    if max_depth_error == 0.0:
        raise InputError("max_depth_error", "must be > 0")
    per_pair: dict[tuple[int, int], float] = {}
    valid_share: dict[tuple[int, int], float] = {}
    for i, j in pairs:
        valid, xy = _agreeing_pixels(cameras[i], depths[i], cameras[j], depths[j], max_depth_error)
        valid_share[(i, j)] = float(valid.mean())
        if valid.any():
            warped = sample_bilinear(views[j].astype(np.float32) / np.float32(255.0), xy[..., 0], xy[..., 1])
            per_pair[(i, j)] = psnr(views[i], warped, valid)
    mean = float(np.mean(list(per_pair.values()))) if per_pair else math.nan
    return OverlapScore(mean, per_pair, valid_share)


def overlap_psnr_ratio(generated: object, ground_truth: object) -> dict[str, object]:
    """Generated overlap PSNR relative to ground truth's, both ways the paper's table can be read.

    Accepts any score with ``mean`` and ``per_pair`` (an :class:`OverlapScore` or the panorama
    ``OverlapPSNR``). Returns

    * ``ratio_of_means``: generated mean PSNR / ground-truth mean PSNR, each over its own scored
      pairs. This reproduces the paper's panorama ratios (25.4 / 37.7 = 0.67).
    * ``mean_of_ratios``: the mean over pairs scored in both of generated / ground-truth PSNR per
      pair. The paper's depth ratios (0.76, 0.44) do not equal the quotient of its PSNR columns
      and are probably this; it also weighs every pair alike, whatever its ground-truth PSNR.
    * ``per_pair``: each shared pair's ratio, and ``shared_pairs``: how many there are.

    Equal values (including two ``inf``) give 1; a finite value over ``inf`` gives 0.
    """
    generated_mean, generated_pairs = _score_parts("generated", generated)
    truth_mean, truth_pairs = _score_parts("ground_truth", ground_truth)
    shared = [pair for pair in generated_pairs if pair in truth_pairs]
    if not shared:
        raise InputError("ground_truth", "shares no scored view pair with generated, so there is nothing to compare")
    per_pair = {pair: _ratio(generated_pairs[pair], truth_pairs[pair]) for pair in shared}
    return {
        "ratio_of_means": _ratio(generated_mean, truth_mean),
        "mean_of_ratios": float(np.mean(list(per_pair.values()))),
        "per_pair": per_pair,
        "shared_pairs": len(shared),
    }


def _agreeing_pixels(
    cam_i: Camera, depth_i: np.ndarray, cam_j: Camera, depth_j: np.ndarray, max_depth_error: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of view i seen alike by view j within an absolute depth error, and their landings in j.

    The correspondence module's occlusion test is relative (it serves attention at any scene
    scale); the protocol's threshold is absolute, so it is applied here to the relative error
    times j's depth at the same nearest pixel that error was measured against.
    """
    corr = depth_correspondences(cam_i, depth_i, cam_j, depth_j, tolerance=_LOOSEST_RELATIVE_TOLERANCE)
    xy = corr.xy.astype(np.float64)
    col = np.clip(np.rint(xy[..., 0]), 0, cam_j.width - 1).astype(np.int64)
    row = np.clip(np.rint(xy[..., 1]), 0, cam_j.height - 1).astype(np.int64)
    absolute_error = np.abs(corr.depth_error.astype(np.float64)) * depth_j[row, col]
    return corr.valid & (absolute_error <= max_depth_error), xy


def _validated_inputs(
    images: Sequence[np.ndarray], cameras: Sequence[Camera], depths: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[Camera], list[np.ndarray]]:
    images, cameras, depths = list(images), list(cameras), list(depths)
    if not images:
        raise InputError("images", "need at least two views")
    if len(cameras) != len(images):
        raise InputError("cameras", f"expected one camera per image ({len(images)}), got {len(cameras)}")
    if len(depths) != len(images):
        raise InputError("depths", f"expected one depth map per image ({len(images)}), got {len(depths)}")
    views, maps = [], []
    for k, (image, camera, depth) in enumerate(zip(images, cameras, depths, strict=True)):
        if not isinstance(camera, Camera):
            raise InputError(f"cameras[{k}]", f"must be a Camera, got {type(camera).__name__}")
        views.append(rgb_image(f"images[{k}]", image, camera.height, camera.width))
        maps.append(depth_map(f"depths[{k}]", depth, camera.height, camera.width))
    return views, cameras, maps


def _validated_pairs(pairs: Sequence[tuple[int, int]] | None, count: int) -> list[tuple[int, int]]:
    if pairs is None:
        pairs = [(k, k + 1) for k in range(count - 1)]
    checked = []
    for pair in pairs:
        try:
            i, j = (operator.index(k) for k in pair)
        except (TypeError, ValueError):
            raise InputError("pairs", f"each pair must be two view indices, got {pair!r}") from None
        if not (0 <= i < count and 0 <= j < count) or i == j:
            raise InputError("pairs", f"({i}, {j}) must name two different views among {count}")
        checked.append((i, j))
    if not checked:
        raise InputError("pairs", "no view pairs to compare (need at least two views or explicit pairs)")
    return checked


def _score_parts(field: str, score: object) -> tuple[float, Mapping[tuple[int, int], float]]:
    mean, per_pair = getattr(score, "mean", None), getattr(score, "per_pair", None)
    if not isinstance(per_pair, Mapping) or isinstance(mean, bool) or not isinstance(mean, (int, float)):
        raise InputError(field, f"must be an overlap score with mean and per_pair, got {type(score).__name__}")
    if math.isnan(mean):
        raise InputError(field, "has no scored view pair (its mean PSNR is NaN)")
    return float(mean), per_pair


def _ratio(value: float, reference: float) -> float:
    if value == reference:
        return 1.0
    if math.isinf(reference):
        return 0.0
    if reference == 0.0:
        return math.inf
    return value / reference
