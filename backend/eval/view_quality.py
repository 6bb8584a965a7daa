"""What consistency must not cost: the views' own detail, and the colours their prompts asked for.

Views can be made to agree by blurring them; :func:`high_frequency_energy` catches that (the
``detail_ratio`` of a mode is its energy over that of views generated independently). And they
can agree on the wrong thing; :func:`object_colour_error` compares each object's mean colour in a
generated view with its mean colour in the ground-truth render, which is what the view's prompt
names ("a red sofa, blue striped walls").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MIN_OBJECT_SHARE = 0.03
"""Objects covering less of a view are left out (the synthetic prompts name only larger ones)."""


def _float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def high_frequency_energy(images: Sequence[np.ndarray] | np.ndarray) -> float:
    """Mean squared difference between the views (V, H, W, 3) and their 3 x 3 box blur, on a [0, 1] scale."""
    views = _float(np.stack(list(images)))
    blurred = ndimage.uniform_filter(views, size=(1, 3, 3, 1), mode="nearest")
    return float(np.mean((views - blurred) ** 2))


def object_colour_error(images: np.ndarray, truth: np.ndarray, object_ids: np.ndarray,
                        min_share: float = MIN_OBJECT_SHARE) -> float:
    """Mean distance (RGB on [0, 1]) between each object's mean colour in the generated and true views.

    ``object_ids`` (V, H, W) names the object every pixel shows (-1: nothing); each (view, object)
    covering at least ``min_share`` of the view counts once.
    """
    generated, reference = _float(images), _float(truth)
    errors = []
    for view in range(len(generated)):
        ids = np.asarray(object_ids[view])
        for label in np.unique(ids[ids >= 0]):
            mask = ids == label
            if mask.mean() < min_share:
                continue
            errors.append(np.linalg.norm(generated[view][mask].mean(axis=0) - reference[view][mask].mean(axis=0)))
    return float(np.mean(errors)) if errors else float("nan")
