"""Seam score, overlap PSNR and PSNR on panoramas built from known spherical patterns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.eval.image_metrics import psnr
from backend.eval.panorama_metrics import panorama_overlap_psnr, ring_pairs, seam_discontinuity
from backend.geometry.equirect import equirect_directions, equirect_to_perspective
from backend.geometry.panorama import neighbour_views, panorama_layout
from backend.scenes import sky
from backend.validation import InputError

HEIGHT = 256


def sphere_pattern(dirs: np.ndarray, seed: int = 7) -> np.ndarray:
    """Smooth on the sphere (hence across u = 0 / 1), 10-20 cycles per radian for 256-row panoramas."""
    return sky.sphere_pattern(dirs, seed, cycles=(10.0, 20.0))


def about_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def dirs() -> np.ndarray:
    return equirect_directions(HEIGHT, 2 * HEIGHT)


# ---------------------------------------------------------------------------- seam
@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_seamless_panorama_scores_about_one(dirs, seed):
    seam = seam_discontinuity(sphere_pattern(dirs, seed))
    assert 0.8 < seam.score < 1.25
    assert seam.wrap_difference == pytest.approx(seam.score * seam.neighbour_difference)


def test_brightness_step_at_the_wrap_scores_high(dirs):
    image = sphere_pattern(dirs)
    image[:, HEIGHT:] += 0.1
    seam = seam_discontinuity(image)
    assert seam.score > 5.0
    assert seam.wrap_difference == pytest.approx(0.1, abs=0.02)


def test_fractional_roll_of_half_the_panorama_scores_high(dirs):
    # The right half shows the sphere turned by 7.5 columns: its last column no longer meets column 0.
    image = sphere_pattern(dirs)
    image[:, HEIGHT:] = sphere_pattern(dirs[:, HEIGHT:] @ about_z(2.0 * math.pi * 7.5 / (2 * HEIGHT)).T)
    assert seam_discontinuity(image).score > 5.0
    # Rolling the whole panorama by whole columns only moves the (absent) seam.
    assert seam_discontinuity(np.roll(sphere_pattern(dirs), 100, axis=1)).score < 1.25


def test_seam_score_accepts_uint8_on_the_unit_scale(dirs):
    image = sphere_pattern(dirs)
    image[:, HEIGHT:] += 0.1
    as_uint8 = seam_discontinuity(np.round(image * 255).astype(np.uint8))
    assert as_uint8.wrap_difference == pytest.approx(seam_discontinuity(image).wrap_difference, abs=0.01)
    with pytest.raises(InputError) as error:
        seam_discontinuity(np.zeros((64, 64, 3)))
    assert error.value.field == "equirect"


# ---------------------------------------------------------------------------- overlap PSNR
def cut_views(equirects: list[np.ndarray], cameras) -> list[np.ndarray]:
    return [equirect_to_perspective(equirects[k % len(equirects)], camera) for k, camera in enumerate(cameras)]


def test_views_of_one_panorama_agree_in_their_overlaps(dirs):
    cameras = panorama_layout(size=128)
    views = cut_views([sphere_pattern(dirs)], cameras)
    result = panorama_overlap_psnr(views, cameras)
    assert sorted(result.per_pair) == sorted([(k, (k + 1) % 8) for k in range(8)])
    assert result.mean > 35.0
    assert min(result.per_pair.values()) > 35.0
    print(f"consistent views: overlap PSNR {result.mean:.1f} dB")
    with_poles = [(i, j) for i, near in enumerate(neighbour_views(cameras)) for j in near]
    assert min(panorama_overlap_psnr(views, cameras, with_poles).per_pair.values()) > 35.0
    quantised = [np.round(view * 255).astype(np.uint8) for view in views]
    assert panorama_overlap_psnr(quantised, cameras).mean > 35.0


def test_views_of_different_panoramas_disagree(dirs):
    cameras = panorama_layout(size=128, pole_views=False)
    views = cut_views([sphere_pattern(dirs, seed) for seed in range(8)], cameras)
    result = panorama_overlap_psnr(views, cameras)
    print(f"inconsistent views: overlap PSNR {result.mean:.1f} dB")
    assert result.mean < 20.0
    assert max(result.per_pair.values()) < 20.0


def test_ring_pairs_follow_yaw_not_list_order():
    cameras = panorama_layout(size=16)
    shuffled = [cameras[k] for k in (9, 3, 0, 8, 5, 1, 7, 2, 6, 4)]
    pairs = ring_pairs(shuffled)
    assert len(pairs) == 8
    assert (2, 5) in pairs and (7, 1) in pairs and (6, 2) in pairs  # yaw 0 -> 45, 90 -> 135, 315 -> 0


def test_overlap_psnr_rejects_bad_input():
    cameras = panorama_layout(size=16, pole_views=False)
    views = [np.zeros((16, 16, 3), np.float32) for _ in cameras]
    broken = [view.copy() for view in views]
    broken[3][2, 2, 0] = np.inf
    cases = [
        ((views[:5], cameras, None), "cameras"),
        (([], [], None), "images"),
        ((broken, cameras, None), "images[3]"),
        ((views, cameras, [(0, 4)]), "pairs"),  # opposite views never overlap
        ((views, cameras, [(0, 8)]), "pairs"),
        ((views[:1], cameras[:1], None), "pairs"),
    ]
    for args, field in cases:
        with pytest.raises(InputError) as error:
            panorama_overlap_psnr(*args)
        assert error.value.field == field


# ---------------------------------------------------------------------------- PSNR
def test_psnr_values_and_scales():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.8, size=(8, 8, 3)).astype(np.float32)
    assert psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-3)
    assert psnr(a, a) == float("inf")
    as_uint8 = np.round(a * 255).astype(np.uint8)
    assert psnr(as_uint8, as_uint8.astype(np.float32) / 255) == float("inf")
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    b = a.copy()
    b[4:] += 0.5
    b[:4] += 0.1
    assert psnr(a, b, mask) == pytest.approx(20.0, abs=1e-3)


@pytest.mark.parametrize(
    ("a", "b", "mask", "field"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), None, "b"),
        (np.zeros((4, 4)), np.full((4, 4), np.nan), None, "b"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), np.zeros((4, 4), bool), "mask"),
        (np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), np.ones((3, 4), bool), "mask"),
        (np.zeros(4), np.zeros(4), None, "a"),
    ],
)
def test_psnr_rejects_bad_input(a, b, mask, field):
    with pytest.raises(InputError) as error:
        psnr(a, b, mask)
    assert error.value.field == field
