"""Keyframe selection on a camera trajectory.

MVDiffusion generates keyframes jointly, then fills each window between two consecutive
keyframes with the interpolation module, conditioned on both. Keyframes must overlap enough for
correspondence-aware attention to tie them together (the released code links views above 0.3
overlap) but not so much that the trajectory needs many of them (its test sequences sit around
0.6). We walk the trajectory greedily and take, among the frames that still overlap the last
keyframe enough, the one whose overlap is closest to the middle of the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import InputError, as_array, in_range


@dataclass(frozen=True)
class KeyframePlan:
    """Keyframe indices (sorted, first and last frame included) and the windows between them.

    ``windows[k] = (a, b, in_between)``: consecutive keyframes a < b and the frames strictly
    between them, which the interpolation module generates from a and b. ``pair_overlap[k]`` is
    the overlap of that keyframe pair; ``weak_links`` lists the pairs whose overlap fell below
    the minimum because no frame in between overlapped enough (a cut in the trajectory).
    """

    keyframes: list[int]
    windows: list[tuple[int, int, list[int]]]
    pair_overlap: list[float]
    weak_links: list[tuple[int, int]]


def select_keyframes(overlap: np.ndarray, min_overlap: float = 0.3, max_overlap: float = 0.6) -> KeyframePlan:
    """Choose keyframes along a trajectory from its overlap matrix (see correspondence.overlap_matrix).

    Candidates for the next keyframe are the later frames whose symmetric overlap (the smaller
    of both directions) with the current one stays at least ``min_overlap``, up to the first
    frame that falls below it. Among the candidates within the range, the one closest to its
    middle wins (the farther one on a tie); if all candidates overlap more than
    ``max_overlap`` (the trajectory ends), the farthest; if even the next frame falls short,
    the next frame, recorded as a weak link. Aiming at the middle leaves margin on both sides.
    """
    overlap = as_array("overlap", overlap, dtype=np.float64)
    if overlap.ndim != 2 or overlap.shape[0] != overlap.shape[1] or overlap.shape[0] == 0:
        raise InputError("overlap", f"must be a non-empty square matrix, got shape {overlap.shape}")
    min_overlap = in_range("min_overlap", min_overlap, 0.0, 1.0)
    max_overlap = in_range("max_overlap", max_overlap, 0.0, 1.0)
    if min_overlap > max_overlap:
        raise InputError("min_overlap", f"must not exceed max_overlap ({max_overlap}), got {min_overlap}")
    symmetric = np.minimum(overlap, overlap.T)
    target = 0.5 * (min_overlap + max_overlap)
    count = len(symmetric)
    keyframes, pair_overlap, weak = [0], [], []
    current = 0
    while current < count - 1:
        later = symmetric[current, current + 1 :]
        run = _leading_run(later, min_overlap)
        if run == 0:
            chosen = 0
            weak.append((current, current + 1))
        else:
            candidates = later[:run]
            within = np.flatnonzero(candidates <= max_overlap)
            if within.size:
                distance = np.abs(candidates[within] - target)
                chosen = int(within[np.flatnonzero(distance == distance.min())[-1]])
            else:
                chosen = run - 1
        nxt = current + 1 + chosen
        keyframes.append(nxt)
        pair_overlap.append(float(symmetric[current, nxt]))
        current = nxt
    windows = [(a, b, list(range(a + 1, b))) for a, b in zip(keyframes[:-1], keyframes[1:], strict=True)]
    return KeyframePlan(keyframes, windows, pair_overlap, weak)


def _leading_run(values: np.ndarray, threshold: float) -> int:
    """Length of the leading run of values >= threshold.

    Only the leading run counts: a frame far ahead that happens to look back at the same wall
    must not let the walk skip the frames in between that see something else.
    """
    below = np.flatnonzero(values < threshold)
    return len(values) if below.size == 0 else int(below[0])
