"""Key-token geometry for CAA at every UNet level, built once per job from cameras and depths.

A UNet level of stride s has one feature cell per s x s block of pixels; cell k covers pixels
``[k s, (k + 1) s)`` so its centre is at pixel ``k s + (s - 1) / 2``. A full-resolution pixel
position ``x`` therefore sits at level coordinate ``(x - (s - 1) / 2) / s``; bilinear taps are
taken there (zero outside the image), which is ``grid_sample(align_corners=False)``.

Released behaviour (``released=True``, mvdiffusion.md §4-§6): the released weights were trained
on the released code's tokens, so its rules are reproduced as they are, quirks included:

* sample positions: the full-resolution correspondence of query pixel ``k q + q // 2`` (q the
  query stride), divided by the key scale, minus 0.5, read with ``align_corners=True``. In level
  coordinates that is ``x / key_scale - 0.5``, ``1 / (2 s)`` of a cell left of our
  ``(x - (s - 1) / 2) / s``, expressed here as the ``align_corners=False`` grid that samples the
  same feature location;
* panoramas: a 3 x 3 neighbourhood in dx-major order, the homography without a z > 0 test, the
  key scale taken as ``image width // level height`` (the released call passes the width where
  the key image height belongs; equal to the stride for square views), validity ``0 < x < W``,
  ``0 < y < H`` strictly at ``(u + 0.5) * key_scale``, and the displacement of that position
  mapped back into the query view, in query strides;
* depth: one token per neighbour, correspondences ``K (inv(pose_j) pose_i) X`` divided by
  ``z + 1e-6`` with no occlusion or z > 0 test (-1e6 where the query depth is 0), validity from
  the rounded correspondence (inside ``[0, W) x [0, H)``, neighbour depth > 0, query depth > 0),
  and the encoded scalar ``|depth_query - depth_neighbour|`` in scene units, with 1e6 standing in
  for the neighbour's depth where the landing or that depth is invalid;
* slots: exactly each view's own neighbours, in the order given (the released lists are
  ascending; see :func:`released_depth_neighbours` and :func:`released_panorama_neighbours`).

Precision: depth correspondences are evaluated in float64 and rounded to float32, where the
released code computed them in float32 (they agree to a few float32 ulps); panorama homographies
and their products are computed in float32 with torch, as released, because the released
displacement encoding follows their last bits (:mod:`~backend.models.released_encoding`); from there
the released float32 steps (divide by the key scale, subtract 0.5, add the offsets, add 0.5,
multiply back, round half to even, compare with the bounds) are repeated in float32, and the
encoded depth scalars are float32 differences of the given float32 depths, bit for bit as
released wherever the same pixel is read. The released depth code has one K for all views;
here view i's K unprojects and view j's projects, the same for views that share one.

When views have different neighbour counts a single :class:`LevelGeometry` would pad the
shorter rows with invalid slots, which the released code does not have (they would join the
softmax as zero keys and shift the depth encoding's pairs); such levels are returned as
:class:`~backend.models.caa_tokens.ViewGroups`, one geometry per count. Levels with a side of
1, views of different sizes and views without neighbours have no released behaviour (the
released code divides by zero, cannot batch them, or has no keys) and are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry.cameras import Camera, pinhole, pixel_grid
from ..geometry.correspondence import depth_correspondences, query_pixels
from ..geometry.panorama import rotation_correspondences
from ..validation import InputError, depth_map
from .caa_tokens import LevelGeometry, ViewGroups

RELEASED_OVERLAP_THRESHOLD = 0.3
"""The released depth model's ``overlap_filter``: views are neighbours above this symmetric overlap."""

RELEASED_KERNEL = 3
"""The released panorama's neighbourhood size (``kernal_size``)."""

RELEASED_INVALID_DEPTH = np.float32(1.0e6)
"""Depth the released code puts in place of an invalid neighbour depth (and its 'no depth' pixel coordinate)."""

RELEASED_Z_EPSILON = 1e-6
"""Added to z before the released depth projection's perspective division."""

OUTSIDE = -10.0
"""Level coordinate of unused or non-finite samples: far enough outside that every tap reads zero."""


def grid_from_level_coords(coords: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Level pixel coordinates (..., 2) as ``grid_sample`` coordinates (``align_corners=False``)."""
    grid = np.empty(coords.shape, np.float32)
    grid[..., 0] = (2.0 * coords[..., 0] + 1.0) / width - 1.0
    grid[..., 1] = (2.0 * coords[..., 1] + 1.0) / height - 1.0
    return torch.from_numpy(grid)


def _to_level(xy_full: np.ndarray, stride: int) -> np.ndarray:
    return (xy_full - (stride - 1) / 2.0) / stride


def depth_level_geometry(
    cameras: list[Camera],
    depths: list[np.ndarray],
    neighbours: list[list[int]],
    stride: int,
    tolerance: float = 0.05,
    *,
    released: bool = False,
) -> LevelGeometry | ViewGroups:
    """One token per neighbour at its depth correspondence; encodes the relative depth error.

    Views with fewer neighbours than the most connected one get unused, invalid slots.
    ``released``: the released code's tokens instead (module docstring); ``tolerance`` is then
    unused, and views with different neighbour counts give :class:`ViewGroups`.
    """
    if released:
        return _released_depth_level(cameras, depths, neighbours, stride)
    _check_neighbours(neighbours, len(cameras))
    width, height = cameras[0].width // stride, cameras[0].height // stride
    slots = max(1, max(len(row) for row in neighbours))
    views, pixels = len(cameras), width * height
    source = np.zeros((views, slots), np.int64)
    coords = np.full((views, slots, pixels, 1, 2), -10.0)
    valid = np.zeros((views, pixels, slots), bool)
    error = np.zeros((views, pixels, slots, 1), np.float32)
    for i, row in enumerate(neighbours):
        for n, j in enumerate(row):
            corr = depth_correspondences(cameras[i], depths[i], cameras[j], depths[j], stride, tolerance)
            source[i, n] = j
            coords[i, n, :, 0] = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            valid[i, :, n] = corr.valid.reshape(-1)
            error[i, :, n, 0] = corr.depth_error.reshape(-1)
    return LevelGeometry(
        height, width, torch.from_numpy(source), grid_from_level_coords(coords, height, width),
        torch.from_numpy(valid), torch.from_numpy(error),
    )


def panorama_level_geometry(
    cameras: list[Camera], neighbours: list[list[int]], stride: int, kernel: int = 3, *, released: bool = False
) -> LevelGeometry | ViewGroups:
    """K x K tokens around the rotation correspondences; encodes each token's displacement.

    The displacement is where a token's sample lands back in the query view, minus the query
    pixel, in level pixels: about (0, 0) for the centre token and +-1 around it.
    ``released``: the released code's tokens instead (module docstring; ``kernel`` must be 3),
    and views with different neighbour counts give :class:`ViewGroups`.
    """
    if released:
        return _released_panorama_level(cameras, neighbours, stride, kernel)
    _check_neighbours(neighbours, len(cameras))
    if kernel < 1 or kernel % 2 == 0:
        raise InputError("kernel", f"must be a positive odd number, got {kernel}")
    width, height = cameras[0].width // stride, cameras[0].height // stride
    offsets = np.stack(np.meshgrid(np.arange(kernel) - kernel // 2, np.arange(kernel) - kernel // 2), -1)
    offsets = offsets.reshape(-1, 2).astype(np.float64)  # (K*K, 2) as (dx, dy), dy-major
    samples = len(offsets)
    slots = max(1, max(len(row) for row in neighbours))
    views, pixels = len(cameras), width * height
    source = np.zeros((views, slots), np.int64)
    coords = np.full((views, slots, pixels, samples, 2), -10.0)
    valid = np.zeros((views, pixels, slots * samples), bool)
    displacement = np.zeros((views, pixels, slots * samples, 2), np.float32)
    query = query_pixels(cameras[0].width, cameras[0].height, stride).reshape(-1, 2)
    for i, row in enumerate(neighbours):
        for n, j in enumerate(row):
            corr = rotation_correspondences(cameras[i], cameras[j], stride)
            centre = _to_level(corr.xy.reshape(-1, 2).astype(np.float64), stride)
            landed = corr.valid.reshape(-1)
            source[i, n] = j
            for k, offset in enumerate(offsets):
                t = n * samples + k
                level = centre + offset
                full = level * stride + (stride - 1) / 2.0
                inside = (full[:, 0] > -0.5) & (full[:, 0] < cameras[j].width - 0.5)
                inside &= (full[:, 1] > -0.5) & (full[:, 1] < cameras[j].height - 0.5)
                back = _rotate_pixels(cameras[j], cameras[i], full)
                coords[i, n, :, k] = level
                valid[i, :, t] = landed & inside & np.isfinite(back).all(axis=1)
                displacement[i, :, t] = np.where(valid[i, :, t, None], (back - query) / stride, 0.0)
    return LevelGeometry(
        height, width, torch.from_numpy(source), grid_from_level_coords(coords, height, width),
        torch.from_numpy(valid), torch.from_numpy(displacement),
    )


def _rotate_pixels(source: Camera, target: Camera, xy: np.ndarray) -> np.ndarray:
    """Pixels of ``source`` mapped into ``target`` by the rotation homography (NaN behind it)."""
    rays = source.ray_directions(xy)
    cam = rays @ target.rotation
    z = cam[:, 2]
    safe = np.where(z > 1e-9, z, np.nan)
    return np.stack(pinhole(target.K, cam[:, 0], cam[:, 1], safe), -1)


def _check_neighbours(neighbours: list[list[int]], count: int) -> None:
    if len(neighbours) != count:
        raise InputError("neighbours", f"expected one list per view ({count}), got {len(neighbours)}")
    for i, row in enumerate(neighbours):
        for j in row:
            if not 0 <= j < count or j == i:
                raise InputError(f"neighbours[{i}]", f"invalid neighbour index {j}")


def unet_strides(levels: int = 4) -> list[int]:
    """Image-pixel strides of the UNet levels: the VAE's 8, then halved resolution per level."""
    return [8 * 2**k for k in range(levels)]


def depth_geometry(
    cameras: list[Camera], depths: list[np.ndarray], neighbours: list[list[int]], levels: int = 4,
    tolerance: float = 0.05, *, released: bool = False,
) -> dict[tuple[int, int], LevelGeometry | ViewGroups]:
    """Geometry for every UNet level of the depth task, keyed by the level's (h, w).

    ``released``: the released code's tokens (module docstring), for a model switched to
    :func:`~backend.models.released.use_released_behaviour`; pass the released neighbour lists,
    ``released_depth_neighbours(cameras, depths)``, to reproduce its runs.
    """
    out = {}
    for stride in unet_strides(levels):
        level = depth_level_geometry(cameras, depths, neighbours, stride, tolerance, released=released)
        out[(level.height, level.width)] = level
    return out


def panorama_geometry(
    cameras: list[Camera], neighbours: list[list[int]], levels: int = 4, kernel: int = 3, *, released: bool = False
) -> dict[tuple[int, int], LevelGeometry | ViewGroups]:
    """Geometry for every UNet level of a panorama, keyed by the level's (h, w).

    ``released``: the released code's tokens (module docstring), for a model switched to
    :func:`~backend.models.released.use_released_behaviour`; the released model reads the two
    ring neighbours, ``released_panorama_neighbours(len(cameras))``.
    """
    out = {}
    for stride in unet_strides(levels):
        level = panorama_level_geometry(cameras, neighbours, stride, kernel, released=released)
        out[(level.height, level.width)] = level
    return out


# ---------------------------------------------------------------------------------------------------------- released
class _Slot:
    """One neighbour's tokens for every query pixel: source view, level coordinates (P, S, 2),
    validity (P, S) and encoded quantity (P, S, E)."""

    __slots__ = ("source", "coords", "valid", "values")

    def __init__(self, source: int, coords: np.ndarray, valid: np.ndarray, values: np.ndarray):
        self.source, self.coords, self.valid, self.values = source, coords, valid, values


def released_panorama_neighbours(count: int) -> list[list[int]]:
    """The released panorama's key views: the previous and the next view around the ring, in that order.

    With two views both entries are the other view, as in the released code.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise InputError("count", f"the released code runs CAA with two or more views, got {count!r}")
    return [[(i - 1) % count, (i + 1) % count] for i in range(count)]


def released_depth_overlap(cameras: list[Camera], depths: list[np.ndarray]) -> np.ndarray:
    """(V, V) overlap ratios as the released depth model computes them.

    Before symmetrising, (i, j) is the share of all of view i's pixels whose released
    correspondence (no occlusion or z > 0 test) lands in ``[0, W) x [0, H)`` of view j; pixels
    without depth are sent to -1e6, so they count as outside. The result is the smaller of
    (i, j) and (j, i). The diagonal is computed the same way and never used.
    """
    depths = _released_views(cameras, depths)
    width, height = cameras[0].width, cameras[0].height
    pixels = pixel_grid(width, height).reshape(-1, 2)
    count = len(cameras)
    ratios = np.zeros((count, count))
    for i in range(count):
        z = depths[i].reshape(-1)
        for j in range(count):
            landed = _released_depth_landing(cameras[i], z, pixels, cameras[j])
            with np.errstate(invalid="ignore"):
                inside = (landed[:, 0] >= 0) & (landed[:, 0] < width) & (landed[:, 1] >= 0) & (landed[:, 1] < height)
            ratios[i, j] = inside.mean()
    return np.minimum(ratios, ratios.T)


def released_depth_neighbours(
    cameras: list[Camera], depths: list[np.ndarray], threshold: float = RELEASED_OVERLAP_THRESHOLD
) -> list[list[int]]:
    """Each view's key views as the released depth model picks them, in its (ascending) order.

    Every other view whose :func:`released_depth_overlap` exceeds ``threshold``; a view with none
    falls back to its neighbours in the sequence, as released: view 0 to [1], the last view to
    the one before it, any other view i to [i - 1, i + 1].
    """
    overlap = released_depth_overlap(cameras, depths)
    count = len(cameras)
    out = []
    for i in range(count):
        row = [j for j in range(count) if j != i and overlap[i, j] > threshold]
        if not row:
            row = [1] if i == 0 else [count - 2] if i == count - 1 else [i - 1, i + 1]
        out.append(row)
    return out


def _released_depth_landing(cam_i: Camera, z: np.ndarray, xy: np.ndarray, cam_j: Camera) -> np.ndarray:
    """Released correspondences (N, 2) of view i's pixels ``xy`` (N, 2) with planar depths ``z`` in view j.

    ``X = z ((x - cx) / fx, (y - cy) / fy, 1)``, moved by ``inv(pose_j) pose_i`` and projected by
    ``K_j`` with a division by ``z + 1e-6``; -1e6 where the depth is 0. The released code has one
    K for all views; here view i's K unprojects and view j's projects, which is the same thing
    for views that share one.
    """
    K = cam_i.K
    z = np.asarray(z, np.float64)
    points = np.stack([z * (xy[:, 0] - K[0, 2]) / K[0, 0], z * (xy[:, 1] - K[1, 2]) / K[1, 1], z], axis=-1)
    relative = np.linalg.inv(cam_j.cam_to_world) @ cam_i.cam_to_world
    projected = (points @ relative[:3, :3].T + relative[:3, 3]) @ cam_j.K.T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        landed = projected[:, :2] / (projected[:, 2:] + RELEASED_Z_EPSILON)
    landed[z == 0] = -RELEASED_INVALID_DEPTH
    return landed


def _homography32(source: Camera, target: Camera) -> torch.Tensor:
    """``K_t inv(R_t) R_s inv(K_s)`` (pixels of ``source`` to ``target`` for a scene at infinity), computed
    as the released panorama computes it: float32 matrices, torch's inverse and products.

    The released displacement encoding multiplies by up to 2 ** 79 (dim 320), so its output
    follows the last bit of these numbers; computing them as it does is what lets the two agree.
    """
    def f32(matrix: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(matrix, np.float32))

    return f32(target.K) @ torch.inverse(f32(target.rotation)) @ f32(source.rotation) @ torch.inverse(f32(source.K))


def _apply_homography32(matrix: torch.Tensor, xy: np.ndarray) -> np.ndarray:
    """Dehomogenised ``matrix @ (x, y, 1)`` in float32 for pixels (..., 2), no z > 0 test (as released)."""
    points = torch.from_numpy(np.ascontiguousarray(xy, np.float32)).reshape(-1, 2)
    homogeneous = torch.cat([points, torch.ones(len(points), 1)], dim=1).T  # (3, N), as released
    p = (matrix @ homogeneous).T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (p[:, :2] / p[:, 2:]).numpy().reshape(xy.shape)


def _released_views(cameras: list[Camera], depths: list[np.ndarray] | None = None) -> list[np.ndarray] | None:
    """Check what the released code can express: two or more views of one size; validate depths."""
    if len(cameras) < 2:
        raise InputError("cameras", f"the released code runs CAA with two or more views, got {len(cameras)}")
    width, height = cameras[0].width, cameras[0].height
    for k, camera in enumerate(cameras):
        if (camera.width, camera.height) != (width, height):
            raise InputError(f"cameras[{k}]", f"the released code needs every view at one size ({width}x{height})")
    if depths is None:
        return None
    if len(depths) != len(cameras):
        raise InputError("depths", f"expected one depth map per camera ({len(cameras)}), got {len(depths)}")
    return [depth_map(f"depths[{k}]", depth, height, width) for k, depth in enumerate(depths)]


def _released_level(cameras: list[Camera], neighbours: list[list[int]], stride: int) -> tuple[int, int, np.ndarray]:
    """Level size and query pixels (P, 2); rejects what the released code cannot run."""
    _check_neighbours(neighbours, len(cameras))
    for i, row in enumerate(neighbours):
        if not row:
            raise InputError(
                f"neighbours[{i}]",
                "the released code gives every view at least one key view (released_depth_neighbours falls back "
                "to adjacent views); a view without any has no released behaviour",
            )
    query = query_pixels(cameras[0].width, cameras[0].height, stride)
    height, width = query.shape[:2]
    if height < 2 or width < 2:
        raise InputError(
            "stride",
            f"the released code normalises level coordinates by (size - 1); at stride {stride} the level is "
            f"{height}x{width} and it divides by zero",
        )
    return height, width, query.reshape(-1, 2)


def _released_depth_level(
    cameras: list[Camera], depths: list[np.ndarray], neighbours: list[list[int]], stride: int
) -> LevelGeometry | ViewGroups:
    depths = _released_views(cameras, depths)
    height, width, query = _released_level(cameras, neighbours, stride)
    image_h, image_w = cameras[0].height, cameras[0].width
    key_scale = np.float32(image_h // height)
    pixel_x, pixel_y = query[:, 0].astype(np.int64), query[:, 1].astype(np.int64)
    rows = []
    for i, row in enumerate(neighbours):
        z_query = depths[i][pixel_y, pixel_x]
        slots = []
        for j in row:
            landed = _released_depth_landing(cameras[i], z_query, query, cameras[j]).astype(np.float32)
            with np.errstate(invalid="ignore", over="ignore"):
                level = landed / key_scale - np.float32(0.5)
                rounded = np.rint((level + np.float32(0.5)) * key_scale)
                finite = np.isfinite(rounded).all(axis=-1)
                rounded = np.where(finite[:, None], rounded, -1.0)
                inside = (rounded[:, 0] >= 0) & (rounded[:, 0] < image_w) & (rounded[:, 1] >= 0)
                inside &= rounded[:, 1] < image_h
            x = np.clip(rounded[:, 0], 0, image_w - 1).astype(np.int64)
            y = np.clip(rounded[:, 1], 0, image_h - 1).astype(np.int64)
            z_key = depths[j][y, x]
            seen = inside & (z_key > 0)
            z_key = np.where(seen, z_key, RELEASED_INVALID_DEPTH)
            value = np.abs(z_query - z_key)
            slots.append(_Slot(j, level[:, None, :], (seen & (z_query > 0))[:, None], value[:, None, None]))
        rows.append(slots)
    return _assemble(height, width, rows, samples=1, inputs=1)


def _released_panorama_level(
    cameras: list[Camera], neighbours: list[list[int]], stride: int, kernel: int
) -> LevelGeometry | ViewGroups:
    if kernel != RELEASED_KERNEL:
        raise InputError("kernel", f"the released panorama reads a {RELEASED_KERNEL}x{RELEASED_KERNEL} neighbourhood")
    _released_views(cameras)
    height, width, query = _released_level(cameras, neighbours, stride)
    image_h, image_w = cameras[0].height, cameras[0].width
    query_scale = image_h // height
    key_scale = np.float32(image_w // height)
    steps = np.arange(kernel) - kernel // 2
    offsets = np.array([(dx, dy) for dx in steps for dy in steps], np.float32)  # dx-major, as released
    rows = []
    for i, row in enumerate(neighbours):
        slots = []
        for j in row:
            landed = _apply_homography32(_homography32(cameras[i], cameras[j]), query.astype(np.float32))
            with np.errstate(invalid="ignore", over="ignore"):
                level = (landed / key_scale - np.float32(0.5))[:, None, :] + offsets  # (P, S, 2)
                full = (level + np.float32(0.5)) * key_scale
                valid = (full[..., 0] > 0) & (full[..., 0] < image_w) & (full[..., 1] > 0) & (full[..., 1] < image_h)
                back = _apply_homography32(_homography32(cameras[j], cameras[i]), full)
                displacement = (back - query[:, None, :].astype(np.float32)) / np.float32(query_scale)
            displacement = np.where(np.isfinite(displacement), displacement, np.float32(0.0))
            slots.append(_Slot(j, level, valid, displacement))
        rows.append(slots)
    return _assemble(height, width, rows, samples=len(offsets), inputs=2)


def _assemble(
    height: int, width: int, rows: list[list[_Slot]], samples: int, inputs: int
) -> LevelGeometry | ViewGroups:
    """Views' own slots as one :class:`LevelGeometry`, or one part per slot count as :class:`ViewGroups`."""
    counts = sorted({len(row) for row in rows})
    if len(counts) == 1:
        return _part(height, width, rows, list(range(len(rows))), samples, inputs)
    parts, owners = [], []
    for count in counts:
        owner = [i for i, row in enumerate(rows) if len(row) == count]
        parts.append(_part(height, width, rows, owner, samples, inputs))
        owners.append(torch.tensor(owner, dtype=torch.long))
    return ViewGroups(len(rows), tuple(parts), tuple(owners))


def _part(
    height: int, width: int, rows: list[list[_Slot]], owners: list[int], samples: int, inputs: int
) -> LevelGeometry:
    """The tokens of the views ``owners``, one row each; every view has exactly ``len(rows[i])`` slots here."""
    views, pixels = len(owners), height * width
    count = len(rows[owners[0]])
    source = np.zeros((views, count), np.int64)
    coords = np.full((views, count, pixels, samples, 2), OUTSIDE)
    valid = np.zeros((views, pixels, count * samples), bool)
    values = np.zeros((views, pixels, count * samples, inputs), np.float32)
    for k, i in enumerate(owners):
        for n, slot in enumerate(rows[i]):
            tokens = slice(n * samples, (n + 1) * samples)
            position = slot.coords.astype(np.float64)
            position[~np.isfinite(position).all(axis=-1)] = OUTSIDE
            source[k, n] = slot.source
            # Far outside is far outside: clipping keeps the grid finite in float32 and still reads zeros.
            coords[k, n] = np.clip(position, -1e7, 1e7)
            valid[k, :, tokens] = slot.valid
            values[k, :, tokens] = slot.values
    return LevelGeometry(
        height, width, torch.from_numpy(source), grid_from_level_coords(coords, height, width),
        torch.from_numpy(valid), torch.from_numpy(values),
    )
