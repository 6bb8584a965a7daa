"""The one sample type every training data set yields.

A sample is a set of views that the model generates jointly: images, cameras in the project's
conventions (``K`` + OpenCV ``cam_to_world``), planar depths for the depth task, and one prompt
per view. Data sets are plain map-style objects (``__len__``, ``__getitem__``) that import no
torch, so a training loop can wrap them in a ``DataLoader`` with ``collate_fn=list`` (the
cameras are not tensors, so the default collation does not apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..geometry.cameras import Camera
from ..validation import InputError

TASKS = ("depth", "panorama")
SHARED_CENTRE_TOLERANCE = 1e-6


@dataclass(eq=False)
class MultiViewSample:
    """``V`` views of one scene.

    * ``task``: ``"depth"`` (scene views with metric depth, for the depth-conditioned model) or
      ``"panorama"`` (views around one shared centre, related by rotations alone).
    * ``images``: uint8 (V, H, W, 3) sRGB, row 0 at the top.
    * ``cameras``: one :class:`Camera` per view, each ``W`` x ``H``.
    * ``depths``: float32 (V, H, W) planar z in metres, 0 where invalid; depth task only, None for
      panoramas.
    * ``prompts``: one string per view.
    * ``keyframes``: positions (into the V views) of the views that are keyframes, ascending; all
      of them for a generation sample, None where the notion does not apply (panoramas).
    * ``meta``: free-form provenance (scene id, frame ids, the procedural recipe, ...). Training
      code must not depend on it; tests and debugging do.
    """

    task: str
    images: np.ndarray
    cameras: list[Camera]
    depths: np.ndarray | None
    prompts: list[str]
    keyframes: list[int] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_views(self) -> int:
        return int(np.shape(self.images)[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every view."""
        shape = np.shape(self.images)
        return int(shape[2]), int(shape[1])

    def validate(self) -> MultiViewSample:
        """Check every field against the others; raise :class:`InputError` naming the field. Returns self."""
        if self.task not in TASKS:
            raise InputError("task", f"must be one of {TASKS}, got {self.task!r}")
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise InputError("images", f"must be a uint8 numpy array, got {kind}")
        if images.ndim != 4 or images.shape[3] != 3 or 0 in images.shape:
            raise InputError("images", f"expected shape (V, H, W, 3), got {images.shape}")
        views, height, width = images.shape[:3]
        cameras = list(self.cameras) if isinstance(self.cameras, (list, tuple)) else None
        if cameras is None:
            raise InputError("cameras", f"must be a list of Camera, got {type(self.cameras).__name__}")
        if len(cameras) != views:
            raise InputError("cameras", f"expected one camera per view ({views}), got {len(cameras)}")
        for k, camera in enumerate(cameras):
            if not isinstance(camera, Camera):
                raise InputError(f"cameras[{k}]", f"must be a Camera, got {type(camera).__name__}")
            if (camera.width, camera.height) != (width, height):
                raise InputError(
                    f"cameras[{k}]", f"is {camera.width}x{camera.height}, the images are {width}x{height}"
                )
        if self.task == "depth":
            self._validate_depths(views, height, width)
        else:
            if self.depths is not None:
                raise InputError("depths", "must be None for a panorama sample (its views share one centre)")
            centre = cameras[0].center
            for k, camera in enumerate(cameras):
                if np.abs(camera.center - centre).max() > SHARED_CENTRE_TOLERANCE:
                    raise InputError(f"cameras[{k}]", "a panorama's views must share one centre")
        prompts = self.prompts
        if not isinstance(prompts, (list, tuple)) or len(prompts) != views:
            count = len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__
            raise InputError("prompts", f"expected a list of one prompt per view ({views}), got {count}")
        for k, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompts[{k}]", f"must be a string, got {type(prompt).__name__}")
        if self.keyframes is not None:
            keys = list(self.keyframes)
            if not keys:
                raise InputError("keyframes", "must name at least one view, or be None")
            for k, key in enumerate(keys):
                if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < views:
                    raise InputError(f"keyframes[{k}]", f"must be a view index in [0, {views}), got {key!r}")
            if any(b <= a for a, b in zip(keys[:-1], keys[1:], strict=True)):
                raise InputError("keyframes", f"must be strictly ascending, got {keys}")
        if not isinstance(self.meta, dict):
            raise InputError("meta", f"must be a dict, got {type(self.meta).__name__}")
        return self

    def _validate_depths(self, views: int, height: int, width: int) -> None:
        depths = self.depths
        if depths is None:
            raise InputError("depths", "a depth sample needs one depth map per view")
        if not isinstance(depths, np.ndarray) or depths.dtype != np.float32:
            kind = depths.dtype if isinstance(depths, np.ndarray) else type(depths).__name__
            raise InputError("depths", f"must be a float32 numpy array, got {kind}")
        if depths.shape != (views, height, width):
            raise InputError("depths", f"expected shape {(views, height, width)}, got {depths.shape}")
        if not np.isfinite(depths).all():
            raise InputError("depths", "contains non-finite values (use 0 for invalid pixels)")
        if depths.min() < 0:
            raise InputError("depths", "must be >= 0 (0 marks invalid pixels)")
        for k in range(views):
            if not depths[k].any():
                raise InputError(f"depths[{k}]", "has no valid pixel")


def sample_index(index: int, length: int) -> int:
    """A dataset index as Python sequences take it: negative counts from the end, bad ones raise."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an integer, got {type(index).__name__}")
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index out of range for {length} samples")
    return int(index)


class SampleRange:
    """Samples ``start`` to ``stop`` of a data set, as a sequence of their own."""

    def __init__(self, data: Sequence, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.data[self.start + index]
