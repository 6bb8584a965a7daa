import numpy as np
import pytest

from backend.geometry.keyframes import select_keyframes
from backend.validation import InputError


def banded_overlap(count: int, reach: float) -> np.ndarray:
    index = np.arange(count)
    return np.clip(1.0 - np.abs(index[:, None] - index[None]) / reach, 0.0, 1.0)


def test_consecutive_keyframes_overlap_within_the_range():
    plan = select_keyframes(banded_overlap(40, 10.0), 0.3, 0.6)
    assert plan.keyframes[0] == 0 and plan.keyframes[-1] == 39
    assert all(0.3 <= o <= 0.6 for o in plan.pair_overlap[:-1])
    # The last pair may be shorter (the trajectory ends), but never below the minimum.
    assert plan.pair_overlap[-1] >= 0.3
    assert not plan.weak_links


def test_every_frame_lies_in_exactly_one_window_or_is_a_keyframe():
    count = 37
    plan = select_keyframes(banded_overlap(count, 7.0))
    covered = sorted(set(plan.keyframes) | {f for _, _, frames in plan.windows for f in frames})
    assert covered == list(range(count))
    for a, b, frames in plan.windows:
        assert a < b and frames == list(range(a + 1, b))


def test_a_cut_in_the_trajectory_is_reported_as_a_weak_link():
    overlap = banded_overlap(20, 6.0)
    overlap[:10, 10:] = overlap[10:, :10] = 0.0
    plan = select_keyframes(overlap)
    assert (9, 10) in plan.weak_links
    assert 9 in plan.keyframes and 10 in plan.keyframes


def test_asymmetric_overlap_uses_the_weaker_direction():
    overlap = banded_overlap(12, 8.0)
    overlap[0, 4] = 0.95  # one direction looks great, the other (0.5) decides
    plan = select_keyframes(overlap, 0.3, 0.6)
    assert plan.pair_overlap[0] <= 0.6


def test_single_frame_is_its_own_keyframe():
    plan = select_keyframes(np.ones((1, 1)))
    assert plan.keyframes == [0] and plan.windows == []


@pytest.mark.parametrize(
    ("args", "field"),
    [((np.ones((3, 2)),), "overlap"), ((np.ones((3, 3)), 0.7, 0.4), "min_overlap"),
     ((np.ones((3, 3)), -0.1), "min_overlap"), ((np.full((2, 2), np.nan),), "overlap")],
)
def test_bad_input_names_the_field(args, field):
    with pytest.raises(InputError) as err:
        select_keyframes(*args)
    assert err.value.field == field
