"""Overlap PSNR of depth views on the textured demo room, and its ratio to ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from backend.eval.consistency import OverlapScore, depth_overlap_psnr, overlap_psnr_ratio
from backend.eval.panorama_metrics import OverlapPSNR
from backend.geometry.cameras import Camera, look_at
from backend.geometry.render import render_textured
from backend.scenes.demo_room import textured_demo_room, trajectory
from backend.validation import InputError

WIDTH, HEIGHT = 128, 96
VIEWS = 6
# The first poses of a 24-pose loop: consecutive views turn by about 15 degrees and share 55-70 %.
LOOP_POSES = 24


@pytest.fixture(scope="module")
def room():
    return textured_demo_room(256)


@pytest.fixture(scope="module")
def views(room):
    cameras = trajectory(LOOP_POSES, width=WIDTH, height=HEIGHT)[:VIEWS]
    rendered = [render_textured(room.atlas.mesh, room.texture, camera) for camera in cameras]
    return [view.image for view in rendered], cameras, [view.depth for view in rendered]


@pytest.fixture(scope="module")
def consistent(views) -> OverlapScore:
    return depth_overlap_psnr(*views)


def hue_rotation(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis, so brightness stays and only the hue moves."""
    axis = np.ones(3) / math.sqrt(3.0)
    angle = math.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    return np.clip(np.rint(image.astype(np.float64) @ rotation.T), 0, 255).astype(np.uint8)


def hue_shifted(images: list[np.ndarray], seed: int = 3) -> list[np.ndarray]:
    """Each view with its own random hue shift, like views generated apart.

    Shifts of 30-60 degrees alternate in sign, so consecutive views always disagree by 60-120
    degrees: the demo room's muted colours make smaller hue differences hard to see.
    """
    rng = np.random.default_rng(seed)
    angles = rng.uniform(30.0, 60.0, len(images)) * (-1.0) ** np.arange(len(images))
    return [hue_rotation(image, angle) for image, angle in zip(images, angles, strict=True)]


def noise_textured(room, cameras: list[Camera], seed: int = 5) -> list[np.ndarray]:
    """Each view rendered from its own texture: the true one plus independent smooth colour noise."""
    rng = np.random.default_rng(seed)
    images = []
    for camera in cameras:
        noise = ndimage.gaussian_filter(rng.normal(size=room.texture.shape), sigma=(4, 4, 0))
        noise *= 40.0 / noise.std()
        texture = np.clip(room.texture + noise, 0, 255).astype(np.uint8)
        images.append(render_textured(room.atlas.mesh, texture, camera).image)
    return images


# ---------------------------------------------------------------------------- scores
def test_views_of_one_texture_score_high_on_consecutive_pairs(consistent):
    assert list(consistent.valid_share) == [(k, k + 1) for k in range(VIEWS - 1)]
    assert list(consistent.per_pair) == list(consistent.valid_share)
    assert all(0.5 < share < 0.8 for share in consistent.valid_share.values())
    assert consistent.mean_psnr > 35.0
    assert consistent.mean == consistent.mean_psnr == pytest.approx(np.mean(list(consistent.per_pair.values())))
    assert consistent.empty_pairs == []


@pytest.mark.parametrize("perturbation", ["hue", "noise_texture", "shifted_pixels"])
def test_independently_perturbed_views_score_much_lower(room, views, consistent, perturbation):
    images, cameras, depths = views
    if perturbation == "hue":
        perturbed_images = hue_shifted(images)
    elif perturbation == "noise_texture":
        perturbed_images = noise_textured(room, cameras)
    else:
        # Geometry no longer matches the pixels: every other view slides by two pixels.
        perturbed_images = [np.roll(image, 2 * (k % 2), axis=1) for k, image in enumerate(images)]
    perturbed = depth_overlap_psnr(perturbed_images, cameras, depths)
    # Validity depends on geometry only, so both runs compare the very same pixels.
    assert perturbed.valid_share == consistent.valid_share
    assert perturbed.mean_psnr < consistent.mean_psnr - 6.0
    assert all(perturbed.per_pair[pair] < consistent.per_pair[pair] for pair in consistent.per_pair)

    ratio = overlap_psnr_ratio(perturbed, consistent)
    assert ratio["ratio_of_means"] == pytest.approx(perturbed.mean_psnr / consistent.mean_psnr)
    assert ratio["ratio_of_means"] < 0.85
    assert 0.0 < ratio["mean_of_ratios"] < 0.85
    assert ratio["shared_pairs"] == VIEWS - 1


def test_consistent_views_over_themselves_give_a_ratio_of_one(consistent):
    ratio = overlap_psnr_ratio(consistent, consistent)
    assert ratio["ratio_of_means"] == 1.0
    assert ratio["mean_of_ratios"] == 1.0
    assert set(ratio["per_pair"].values()) == {1.0}


def test_ratio_of_means_and_mean_of_ratios_differ_and_panorama_scores_are_accepted():
    generated = OverlapPSNR(20.0, {(0, 1): 10.0, (1, 2): 30.0})
    truth = OverlapPSNR(30.0, {(0, 1): 20.0, (1, 2): 40.0})
    ratio = overlap_psnr_ratio(generated, truth)
    assert ratio["ratio_of_means"] == pytest.approx(20.0 / 30.0)
    assert ratio["mean_of_ratios"] == pytest.approx((10.0 / 20.0 + 30.0 / 40.0) / 2)
    # Only pairs scored in both enter the mean of ratios.
    depth_score = OverlapScore(25.0, {(1, 2): 20.0, (2, 3): 30.0}, {(1, 2): 0.5, (2, 3): 0.5, (3, 4): 0.0})
    mixed = overlap_psnr_ratio(depth_score, truth)
    assert mixed["shared_pairs"] == 1
    assert mixed["mean_of_ratios"] == pytest.approx(0.5)


def test_identical_overlaps_rate_one_even_at_infinite_psnr():
    perfect = OverlapPSNR(math.inf, {(0, 1): math.inf})
    assert overlap_psnr_ratio(perfect, perfect)["mean_of_ratios"] == 1.0
    assert overlap_psnr_ratio(OverlapPSNR(30.0, {(0, 1): 30.0}), perfect)["ratio_of_means"] == 0.0


# ---------------------------------------------------------------------------- empty overlaps
def test_views_that_do_not_overlap_are_reported_not_dropped(room):
    eye = np.array([0.0, 0.0, 1.4])
    targets = ([3.0, 0.0, 1.2], [-3.0, 0.0, 1.2], [3.0, 0.6, 1.2])
    cameras = [Camera.from_fov(80.0, WIDTH, HEIGHT, look_at(eye, eye + target)) for target in targets]
    rendered = [render_textured(room.atlas.mesh, room.texture, camera) for camera in cameras]
    images, depths = [view.image for view in rendered], [view.depth for view in rendered]

    score = depth_overlap_psnr(images, cameras, depths, pairs=[(0, 1), (0, 2)])
    assert score.valid_share[(0, 1)] == 0.0
    assert score.empty_pairs == [(0, 1)]
    assert (0, 1) not in score.per_pair
    assert score.valid_share[(0, 2)] > 0.5
    assert score.mean_psnr == score.per_pair[(0, 2)] > 35.0

    nothing = depth_overlap_psnr(images, cameras, depths, pairs=[(0, 1), (1, 0)])
    assert nothing.per_pair == {}
    assert math.isnan(nothing.mean_psnr)
    assert nothing.empty_pairs == [(0, 1), (1, 0)]
    with pytest.raises(InputError) as error:
        overlap_psnr_ratio(nothing, score)
    assert error.value.field == "generated"


# ---------------------------------------------------------------------------- depth threshold
def test_depths_that_disagree_by_more_than_the_threshold_leave_no_valid_pixel(views, consistent):
    images, cameras, depths = views
    nearest = float(depths[1][depths[1] > 0].min())
    # Scaled so that even the nearest surface reprojects 0.6 m off, while being nowhere near 10x off.
    scaled = [depths[0], depths[1] * (1.0 + 0.6 / nearest), *depths[2:]]
    score = depth_overlap_psnr(images, cameras, scaled, pairs=[(0, 1)])
    assert score.valid_share[(0, 1)] == 0.0
    assert score.empty_pairs == [(0, 1)]
    # The threshold is what drops them: a looser one takes the pixels back.
    loose = depth_overlap_psnr(images, cameras, scaled, pairs=[(0, 1)], max_depth_error=5.0)
    assert loose.valid_share[(0, 1)] >= consistent.valid_share[(0, 1)]


def test_the_threshold_is_absolute_in_scene_units(views, consistent):
    images, cameras, depths = views
    shares = {}
    for offset in (0.4, 0.6):
        shifted = [depths[0], np.where(depths[1] > 0, depths[1] + offset, 0.0).astype(np.float32), *depths[2:]]
        shares[offset] = depth_overlap_psnr(images, cameras, shifted, pairs=[(0, 1)]).valid_share[(0, 1)]
    assert shares[0.4] > 0.95 * consistent.valid_share[(0, 1)]
    assert shares[0.6] < 0.02 * consistent.valid_share[(0, 1)]


# ---------------------------------------------------------------------------- bad input
def test_bad_input_names_the_field(views):
    images, cameras, depths = views
    cases = [
        (lambda: depth_overlap_psnr(images, cameras, depths[:-1]), "depths"),
        (lambda: depth_overlap_psnr(images, cameras[:-1], depths), "cameras"),
        (lambda: depth_overlap_psnr([*images[:2], images[2].astype(np.float32) / 255, *images[3:]], cameras, depths),
         "images[2]"),
        (lambda: depth_overlap_psnr(images, cameras, [depths[0], np.full_like(depths[1], np.nan), *depths[2:]]),
         "depths[1]"),
        (lambda: depth_overlap_psnr([images[0][:-1], *images[1:]], cameras, depths), "images[0]"),
        (lambda: depth_overlap_psnr(images, cameras, depths, pairs=[(0, 0)]), "pairs"),
        (lambda: depth_overlap_psnr(images, cameras, depths, pairs=[(0, VIEWS)]), "pairs"),
        (lambda: depth_overlap_psnr(images[:1], cameras[:1], depths[:1]), "pairs"),
        (lambda: depth_overlap_psnr(images, cameras, depths, max_depth_error=0.0), "max_depth_error"),
        (lambda: depth_overlap_psnr(images, cameras, depths, max_depth_error=float("nan")), "max_depth_error"),
        (lambda: overlap_psnr_ratio({"mean": 1.0}, OverlapPSNR(1.0, {(0, 1): 1.0})), "generated"),
    ]
    for call, field in cases:
        with pytest.raises(InputError) as error:
            call()
        assert error.value.field == field
