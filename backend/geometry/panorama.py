"""Panorama camera layouts and the rotation-only geometry between their views.

All panorama views share one centre and see an environment at infinity, so view i and view j are
related by the homography ``K_j R_j^T R_i K_i^-1`` alone: no depth, no occlusion, and the same
correspondences serve every panorama of a given layout (compute them once per job).

Coverage of the default layout (8 ring views of 90 degrees plus two 120 degree pole views):

* A square ring view at yaw offset ``phi`` from a direction sees it up to latitude
  ``atan(tan(fov / 2) * cos(phi))``. Between two ring views ``phi`` reaches ``180 / n``, so the
  ring covers every longitude up to ``atan(tan(45) * cos(22.5)) = 42.73`` degrees (45 at the view
  centres); this is MVDiffusion's band and why its stitched panorama is cropped to +-42.5.
* A square pole view of field of view ``f`` sees every longitude from its pole down to latitude
  ``90 - f / 2`` (that is along its image axes; along its diagonals it reaches 22.2 for 120). A
  90 degree cube face would stop at 45 and leave a sliver between 42.73 and 45 that nothing sees,
  so the default 120 degrees reaches down to 30 and overlaps the ring over at least 12.7 degrees
  of latitude everywhere, room enough for the stitcher's feathering and for pole CAA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..validation import InputError, in_range, positive_int
from .cameras import Camera, inside, yaw_pitch_rotation
from .correspondence import Correspondences, query_pixels

MIN_POLE_OVERLAP_DEG = 5.0
"""Least latitude band the pole views must share with the ring at every longitude."""

DEFAULT_MIN_OVERLAP = 0.05
BEHIND_SENTINEL = -1.0e6
"""Pixel coordinate given to landings behind view j (finite, far outside every image)."""


def ring_latitude_limit(ring_views: int, fov_deg: float) -> float:
    """Latitude (degrees) up to which a ring of square views sees every longitude.

    0 when the ring does not even close at the horizon.
    """
    half_gap = math.radians(180.0 / ring_views)
    half_fov = math.radians(fov_deg / 2.0)
    if half_gap > half_fov:
        return 0.0
    return math.degrees(math.atan(math.tan(half_fov) * math.cos(half_gap)))


def pole_latitude_limit(pole_fov_deg: float) -> float:
    """Latitude (degrees, absolute) down to which a square pole view sees every longitude."""
    return 90.0 - pole_fov_deg / 2.0


def panorama_layout(
    size: int = 512,
    ring_views: int = 8,
    fov_deg: float = 90.0,
    pole_views: bool = True,
    pole_fov_deg: float = 120.0,
) -> list[Camera]:
    """Square views at the origin: the ring at pitch 0 in generation order, then top and bottom.

    The ring starts at yaw 0 (facing +X, the equirect centre) and turns right by ``360 / n``, as
    MVDiffusion's views do, so the released panorama model sees the layout it was trained on.
    The ring must close (``fov_deg > 360 / ring_views``) and the pole views must overlap it by
    at least ``MIN_POLE_OVERLAP_DEG`` of latitude (see the module docstring for the numbers).
    """
    size = positive_int("size", size)
    ring_views = positive_int("ring_views", ring_views)
    fov_deg = _fov("fov_deg", fov_deg)
    if fov_deg <= 360.0 / ring_views:
        raise InputError(
            "fov_deg", f"{fov_deg} degrees leaves gaps between {ring_views} ring views (need > {360.0 / ring_views})"
        )
    cameras = [_camera(size, fov_deg, 360.0 / ring_views * k, 0.0) for k in range(ring_views)]
    if pole_views:
        pole_fov_deg = _fov("pole_fov_deg", pole_fov_deg)
        band = ring_latitude_limit(ring_views, fov_deg) - pole_latitude_limit(pole_fov_deg)
        if band < MIN_POLE_OVERLAP_DEG:
            raise InputError(
                "pole_fov_deg",
                f"{pole_fov_deg} degrees overlaps the ring by {band:.2f} degrees of latitude, "
                f"need >= {MIN_POLE_OVERLAP_DEG}",
            )
        cameras += [_camera(size, pole_fov_deg, 0.0, 90.0), _camera(size, pole_fov_deg, 0.0, -90.0)]
    return cameras


def rotation_correspondences(cam_i: Camera, cam_j: Camera, stride: int = 1) -> Correspondences:
    """Where view i's query pixels land in view j, treating the scene as infinitely far away.

    Camera centres are ignored (points at infinity have no parallax). Landings in front of j keep
    their coordinates even outside j's image, so a K x K neighbourhood around them can still be
    tested sample by sample; landings behind j get ``BEHIND_SENTINEL``.
    """
    for field, cam in (("cam_i", cam_i), ("cam_j", cam_j)):
        if not isinstance(cam, Camera):
            raise InputError(field, f"must be a Camera, got {type(cam).__name__}")
    query = query_pixels(cam_i.width, cam_i.height, stride)
    homography = cam_j.K @ cam_j.rotation.T @ cam_i.rotation @ np.linalg.inv(cam_i.K)
    p = query @ homography[:, :2].T + homography[:, 2]
    z = p[..., 2]
    in_front = z > 1e-9
    xy = np.where(in_front[..., None], p[..., :2] / np.where(in_front, z, 1.0)[..., None], BEHIND_SENTINEL)
    valid = in_front & inside(xy, cam_j.width, cam_j.height)
    return Correspondences(xy.astype(np.float32), valid, None)


def rotation_overlap_matrix(cameras: Sequence[Camera], stride: int | None = None) -> np.ndarray:
    """O[i, j]: share of view i's pixels seen by view j (O[i, i] = 1), on a coarse query grid.

    Overlap shares are smooth in the grid step; the default step is the largest of 8, 4, 2, 1
    that divides view i's size, which keeps all pairs of a 10-view layout well under a second.
    """
    cameras = list(cameras)
    if not cameras:
        raise InputError("cameras", "need at least one camera")
    count = len(cameras)
    overlap = np.eye(count)
    for i, cam_i in enumerate(cameras):
        step = stride if stride is not None else _coarse_stride(cam_i)
        for j, cam_j in enumerate(cameras):
            if i != j:
                overlap[i, j] = rotation_correspondences(cam_i, cam_j, step).overlap
    return overlap


def neighbour_views(cameras: Sequence[Camera], min_overlap: float = DEFAULT_MIN_OVERLAP) -> list[list[int]]:
    """For each view, the views it shares at least ``min_overlap`` of either image with.

    For the default layout this gives each ring view its two ring neighbours plus both pole
    views, and each pole view every ring view. Ring views 90 degrees apart only touch and the two
    poles never meet, so they are left out. Taking the larger of the two directed shares keeps
    the graph symmetric even between views of different field of view.
    """
    min_overlap = in_range("min_overlap", min_overlap, 0.0, 1.0)
    if min_overlap == 0.0:
        raise InputError("min_overlap", "must be > 0, or every pair of views would be neighbours")
    overlap = rotation_overlap_matrix(cameras)
    shared = np.maximum(overlap, overlap.T)
    return [[j for j in range(len(shared)) if j != i and shared[i, j] >= min_overlap] for i in range(len(shared))]


def neighbourhood_offsets(k: int = 3) -> np.ndarray:
    """(k * k, 2) integer (dx, dy) offsets around a correspondence, in units of the level's stride.

    Correspondence-aware attention reads a k x k patch of the neighbour's features around each
    landing (k = 3 for panoramas, as in MVDiffusion) so that sub-cell misalignment and the
    change of scale between views are absorbed. Rows run dy-major, centre at index ``k * k // 2``.
    """
    k = positive_int("k", k)
    if k % 2 == 0:
        raise InputError("k", f"must be odd so the patch is centred, got {k}")
    steps = np.arange(k, dtype=np.int64) - k // 2
    dy, dx = np.meshgrid(steps, steps, indexing="ij")
    return np.stack([dx.ravel(), dy.ravel()], axis=-1)


def _camera(size: int, fov_deg: float, yaw_deg: float, pitch_deg: float) -> Camera:
    pose = np.eye(4)
    pose[:3, :3] = yaw_pitch_rotation(yaw_deg, pitch_deg)
    return Camera.from_fov(fov_deg, size, size, pose)


def _fov(field: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(number) or not 0.0 < number < 180.0:
        raise InputError(field, f"must lie in (0, 180) degrees, got {value!r}")
    return number


def _coarse_stride(camera: Camera) -> int:
    return next(s for s in (8, 4, 2, 1) if camera.width % s == 0 and camera.height % s == 0)
