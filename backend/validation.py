"""Input checks that fail early with the name of the offending field.

Everything that crosses a boundary (the wire, the command line, a public function of the
geometry package) goes through these helpers, so a user sees ``depth[3]: contains NaN`` instead
of a broadcasting error from deep inside numpy. Only numpy and the standard library are used:
the Blender add-on imports this module too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InputError(ValueError):
    """A bad input value; ``field`` names the offending field as the user wrote it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def as_array(
    field: str,
    value: object,
    *,
    shape: Sequence[int | None] | None = None,
    dtype: type | np.dtype | None = np.float32,
    finite: bool = True,
) -> np.ndarray:
    """Convert ``value`` to an array of ``dtype`` and check its shape and finiteness.

    ``shape`` may hold ``None`` for a free axis. Integer targets reject non-integral floats,
    so a UV array passed where triangle indices belong fails here rather than being truncated.
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists, objects numpy cannot hold
        raise InputError(field, f"cannot be read as an array ({exc})") from None
    if arr.dtype == object:
        raise InputError(field, "must be a numeric array, got a ragged or object array")
    if arr.dtype.kind not in "biuf":
        raise InputError(field, f"must be numeric, got dtype {arr.dtype}")
    if shape is not None:
        if arr.ndim != len(shape) or any(
            want is not None and have != want for have, want in zip(arr.shape, shape, strict=True)
        ):
            want_text = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
            raise InputError(field, f"expected shape {want_text}, got {tuple(arr.shape)}")
    if finite and arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(field, f"contains {bad} non-finite value(s) (NaN or inf)")
    if dtype is None:
        return arr
    target = np.dtype(dtype)
    if target.kind in "iu" and arr.dtype.kind == "f":
        if arr.size and not np.array_equal(arr, np.round(arr)):
            raise InputError(field, "must hold integers")
    return np.ascontiguousarray(arr, dtype=target)


def positive_int(field: str, value: object) -> int:
    """An integer > 0 (image sizes, texture sizes, counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(field, f"must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise InputError(field, f"must be > 0, got {value}")
    return int(value)


def in_range(field: str, value: float, low: float, high: float) -> float:
    """A finite float within [low, high]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(field, f"must be a number, got {value!r}") from None
    if not np.isfinite(number) or not low <= number <= high:
        raise InputError(field, f"must lie in [{low}, {high}], got {value!r}")
    return number


def depth_map(field: str, depth: object, height: int, width: int) -> np.ndarray:
    """A planar depth map: float32 (H, W), finite, >= 0, with 0 meaning 'nothing hit'."""
    arr = as_array(field, depth, shape=(height, width), dtype=np.float32)
    if arr.size and arr.min() < 0:
        raise InputError(field, "must be >= 0 (0 marks pixels where nothing was hit)")
    return arr


def rgb_image(field: str, image: object, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A uint8 (H, W, 3) sRGB image, row 0 at the top."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError(field, f"must be uint8 sRGB, got dtype {arr.dtype}")
    return as_array(field, arr, shape=(height, width, 3), dtype=np.uint8)
