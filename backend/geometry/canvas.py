"""One shared canvas behind all views of a job: a mesh's UV atlas, or the panorama's equirect.

Canvas synchronisation (SyncMVD's idea) keeps views consistent without trained weights: each
view's estimate is sampled onto the canvas, the views' samples are blended there with visibility
and view-angle weights, and the blend is mapped back into every view that sees the canvas.
Both directions depend only on cameras and geometry, so a :class:`CanvasMap` holds them as sparse
taps, built once per job and per view resolution (latents or images), and every use is a few
gathers and scatter-adds.

Mapping back uses the difference to the view's own sample: a view receives
``G(fused) - G(own)``, where ``own`` is the canvas as this view alone sampled it and ``G`` the
canvas-to-view lookup. Detail the round trip through the canvas would blur stays, only the
views' disagreement moves, and views that already agree are left exactly as they are.

* Mesh: the texels of an atlas rasterised at the canvas size, sampled as the bake samples them
  (:func:`~backend.geometry.bake.view_taps`: depth-tested, ``cos ** power`` weights), and looked
  up from each pixel's interpolated UV where the pixel sees the textured mesh.
* Panorama: an equirect in Cycles' convention, poles included, sampled as the stitcher samples
  it (:func:`~backend.geometry.equirect.border_weight`), wrapping around in longitude.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..validation import InputError
from .bake import BakeSettings, TexelChunks, view_taps
from .cameras import Camera
from .equirect import DEFAULT_FEATHER, border_weight, equirect_directions, equirect_pixel, project_directions
from .mesh import Mesh
from .raster import rasterize_uv, rasterize_view

DEPTH_AGREEMENT = 0.05
"""Relative depth agreement between a pixel's textured surface and the job's depth (occluders excluded)."""


@dataclass
class CanvasMap:
    """Sparse maps between V views of ``height`` x ``width`` pixels and a canvas of ``cells`` cells.

    Splat (views -> canvas), one row per (view, cell) the view sees: ``splat_view`` and
    ``splat_cell`` (n,), ``splat_taps`` (n, 4) into the views' flattened pixels
    (view * h * w + y * w + x) with ``splat_tap_weights`` (n, 4) summing to 1, and the blend
    weight ``splat_weight`` (n,). Gather (canvas -> views), one row per pixel that sees the
    canvas: ``gather_pixel`` (m,) flattened as above and ``gather_taps`` / ``gather_tap_weights``
    (m, 4) into the cells (weight 0 for a tap off the canvas).
    """

    views: int
    height: int
    width: int
    cells: int
    splat_view: torch.Tensor
    splat_cell: torch.Tensor
    splat_taps: torch.Tensor
    splat_tap_weights: torch.Tensor
    splat_weight: torch.Tensor
    gather_pixel: torch.Tensor
    gather_taps: torch.Tensor
    gather_tap_weights: torch.Tensor

    def to(self, device: torch.device | str) -> CanvasMap:
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        return CanvasMap(self.views, self.height, self.width, self.cells, **moved)

    def blend(self, views: torch.Tensor, sharpness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The canvas (cells, C) blended from ``views`` (V, C, h, w), its weight (cells,), and the
        views' own samples (n, C) in splat-row order. ``sharpness``: the power of the blend weights."""
        self._check(views)
        channels = views.shape[1]
        flat = views.permute(0, 2, 3, 1).reshape(-1, channels)
        weights = self.splat_tap_weights.to(flat.dtype)
        own = (flat[self.splat_taps] * weights[..., None]).sum(dim=1)  # (n, C)
        weight = self.splat_weight.to(flat.dtype)
        if sharpness != 1.0:
            # Relative to the cell's best view before the power, so the best keeps weight 1 and no
            # cell's weights all underflow to 0.
            best = torch.zeros(self.cells, dtype=flat.dtype, device=flat.device)
            best.scatter_reduce_(0, self.splat_cell, weight, reduce="amax")
            weight = (weight / best[self.splat_cell].clamp_min(torch.finfo(flat.dtype).tiny)).pow(sharpness)
        total = torch.zeros(self.cells, channels, dtype=flat.dtype, device=flat.device)
        total.index_add_(0, self.splat_cell, own * weight[:, None])
        weight_sum = torch.zeros(self.cells, dtype=flat.dtype, device=flat.device)
        weight_sum.index_add_(0, self.splat_cell, weight)
        canvas = total / weight_sum.clamp_min(torch.finfo(flat.dtype).tiny)[:, None]
        return canvas, weight_sum, own

    def synchronise(self, views: torch.Tensor, sharpness: float = 1.0) -> torch.Tensor:
        """``views`` (V, C, h, w) moved to the blended canvas wherever they see it (module docstring)."""
        canvas, _, own = self.blend(views, sharpness)
        channels = views.shape[1]
        pixels = self.height * self.width
        # The canvas as each view alone saw it: (view, cell) -> its own sample, unseen cells marked.
        own_canvas = torch.zeros(self.views * self.cells, channels, dtype=views.dtype, device=views.device)
        seen = torch.zeros(self.views * self.cells, dtype=torch.bool, device=views.device)
        slots = self.splat_view * self.cells + self.splat_cell
        own_canvas[slots] = own
        seen[slots] = True
        view = self.gather_pixel // pixels
        own_slots = view[:, None] * self.cells + self.gather_taps  # (m, 4)
        tap_weights = self.gather_tap_weights.to(views.dtype) * seen[own_slots].to(views.dtype)
        norm = tap_weights.sum(dim=1)
        keep = norm > 0
        tap_weights = tap_weights[keep] / norm[keep, None]
        difference = canvas[self.gather_taps[keep]] - own_canvas[own_slots[keep]]  # (m', 4, C)
        update = (difference * tap_weights[..., None]).sum(dim=1)
        flat = views.permute(0, 2, 3, 1).reshape(-1, channels).clone()
        flat.index_add_(0, self.gather_pixel[keep], update)
        return flat.view(self.views, self.height, self.width, channels).permute(0, 3, 1, 2).contiguous()

    def project(self, views: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The canvas blended from the ``sources`` views only (bool (V,)), seen from every view.

        Returns the values (V, C, h, w), 0 where the sources left the canvas blank, and the share
        (V, 1, h, w) in [0, 1] of each pixel's lookup that lands on canvas the sources saw.
        """
        self._check(views)
        keep = sources.to(self.splat_view.device)[self.splat_view]
        weight = self.splat_weight * keep.to(self.splat_weight.dtype)
        only = CanvasMap(**{**{n: getattr(self, n) for n in ("views", "height", "width", "cells")},
                            **{n: getattr(self, n) for n in _TENSORS}, "splat_weight": weight})
        canvas, weight_sum, _ = only.blend(views)
        tap_weights = self.gather_tap_weights.to(views.dtype) * (weight_sum > 0).to(views.dtype)[self.gather_taps]
        share = tap_weights.sum(dim=1)
        ok = share > 0
        channels = views.shape[1]
        values = torch.zeros(self.views * self.height * self.width, channels, dtype=views.dtype, device=views.device)
        normalised = tap_weights[ok] / share[ok, None]
        values[self.gather_pixel[ok]] = (canvas[self.gather_taps[ok]] * normalised[..., None]).sum(dim=1)
        mask = torch.zeros(self.views * self.height * self.width, dtype=views.dtype, device=views.device)
        mask[self.gather_pixel[ok]] = share[ok]
        values = values.view(self.views, self.height, self.width, channels).permute(0, 3, 1, 2).contiguous()
        return values, mask.view(self.views, 1, self.height, self.width)

    def coverage(self) -> torch.Tensor:
        """bool (V, h, w): the pixels each view maps back from the canvas."""
        mask = torch.zeros(self.views * self.height * self.width, dtype=torch.bool, device=self.gather_pixel.device)
        mask[self.gather_pixel] = self.gather_tap_weights.sum(dim=1) > 0
        return mask.view(self.views, self.height, self.width)

    def _check(self, views: torch.Tensor) -> None:
        if views.ndim != 4 or (views.shape[0], views.shape[2], views.shape[3]) != (self.views, self.height, self.width):
            raise ValueError(
                f"expected {self.views} views of {self.height}x{self.width}, got {tuple(views.shape)}"
            )


_TENSORS = ("splat_view", "splat_cell", "splat_taps", "splat_tap_weights", "splat_weight",
            "gather_pixel", "gather_taps", "gather_tap_weights")


def _grid_taps(x: np.ndarray, y: np.ndarray, width: int, height: int, wrap_x: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (n, 4) into a width x height grid at continuous pixel coordinates, and their weights."""
    if wrap_x:
        x0 = np.floor(x)
        fx = x - x0
        xa, xb = np.mod(x0, width).astype(np.int64), np.mod(x0 + 1, width).astype(np.int64)
    else:
        x = np.clip(x, 0.0, width - 1.0)
        x0 = np.minimum(np.floor(x), max(width - 2, 0))
        fx = x - x0
        xa, xb = x0.astype(np.int64), np.minimum(x0 + 1, width - 1).astype(np.int64)
    y = np.clip(y, 0.0, height - 1.0)
    y0 = np.minimum(np.floor(y), max(height - 2, 0))
    fy = y - y0
    ya, yb = y0.astype(np.int64), np.minimum(y0 + 1, height - 1).astype(np.int64)
    taps = np.stack([ya * width + xa, ya * width + xb, yb * width + xa, yb * width + xb], axis=1)
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    return taps, weights.astype(np.float32)


def _views_at(cameras: Sequence[Camera]) -> tuple[int, int]:
    cameras = list(cameras)
    if not cameras:
        raise InputError("cameras", "need at least one view")
    width, height = cameras[0].width, cameras[0].height
    if any((c.width, c.height) != (width, height) for c in cameras):
        raise InputError("cameras", "all views must share one size")
    return width, height


def latent_depth(depth: np.ndarray, factor: int) -> np.ndarray:
    """A full-resolution depth map at 1 / ``factor``: the pixel at each cell's centre (as query pixels)."""
    depth = np.asarray(depth, dtype=np.float32)
    return np.ascontiguousarray(depth[factor // 2::factor, factor // 2::factor])


def canvas_size(cameras: Sequence[Camera], depths: Sequence[np.ndarray], mesh: Mesh, low: int = 32,
                high: int = 1024, probe: int = 128) -> int:
    """Atlas size at which texels come about as dense on the surface as the views' pixels.

    A probe atlas of ``probe`` texels says which share of the atlas each view sees; the view that
    sees its share most densely sets the size (rounded up to a power of two), so no view's
    pixels are merged more than about four to a texel.
    """
    if mesh.uvs is None:
        raise InputError("mesh", "needs UVs for a texture canvas")
    chunks = TexelChunks(rasterize_uv(mesh, probe))
    settings = BakeSettings()
    side = 1.0
    for camera, depth in zip(cameras, depths, strict=True):
        depth = np.asarray(depth, np.float32)
        texels = chunks.texels_in_frustum(camera)
        if texels.numel() == 0:
            continue
        seen = view_taps(texels, chunks, camera, torch.from_numpy(depth.ravel()), settings)[0].numel()
        if seen:
            side = max(side, probe * math.sqrt(np.count_nonzero(depth > 0) / seen))
    return int(min(high, max(low, 2 ** math.ceil(math.log2(side)))))


def mesh_canvas(mesh: Mesh, cameras: Sequence[Camera], depths: Sequence[np.ndarray], size: int,
                settings: BakeSettings | None = None) -> CanvasMap:
    """The UV atlas of ``mesh`` (which must carry UVs) at ``size`` texels as the canvas of these views.

    ``depths`` are the views' planar depths at their own resolution (occluders included).
    """
    if mesh.uvs is None:
        raise InputError("mesh", "needs UVs for a texture canvas")
    width, height = _views_at(cameras)
    settings = settings or BakeSettings()
    chunks = TexelChunks(rasterize_uv(mesh, size))
    cell_of_texel = np.full(size * size, -1, np.int64)
    cell_of_texel[chunks.index] = np.arange(len(chunks.index))
    pixels = width * height
    splat: list[tuple] = []
    gather: list[tuple] = []
    for k, (camera, depth) in enumerate(zip(cameras, depths, strict=True)):
        depth = np.asarray(depth, np.float32)
        texels = chunks.texels_in_frustum(camera)
        if texels.numel():
            cells, taps, tap_weights, weight = view_taps(texels, chunks, camera, torch.from_numpy(depth.ravel()),
                                                         settings)
            view = torch.full_like(cells, k)
            splat.append((view, cells, taps + k * pixels, tap_weights, weight))
        raster = rasterize_view(mesh, camera)
        hit = raster.covered & (depth > 0)
        hit &= np.abs(raster.depth - depth) <= DEPTH_AGREEMENT * np.maximum(depth, 1e-9)
        rows, cols = np.nonzero(hit)
        uv = raster.interpolate(mesh.uvs)[rows, cols].astype(np.float64)
        taps, tap_weights = _grid_taps(uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5, size, size, False)
        cells = cell_of_texel[taps]
        tap_weights = np.where(cells >= 0, tap_weights, 0.0).astype(np.float32)
        gather.append((k * pixels + rows * width + cols, np.maximum(cells, 0), tap_weights))
    return _assemble(len(cameras), height, width, len(chunks.index), splat, gather)


def equirect_canvas(cameras: Sequence[Camera], height: int | None = None,
                    feather: float = DEFAULT_FEATHER) -> CanvasMap:
    """An equirect (``height`` x 2 ``height``) as the canvas of views around one centre.

    Without ``height``, one equirect row per view pixel of the narrowest field of view.
    """
    width, view_height = _views_at(cameras)
    if height is None:
        pixels_per_degree = max(c.width / c.fov_x_deg for c in cameras)
        height = max(4, int(math.ceil(180.0 * pixels_per_degree)))
    dirs = equirect_directions(height, 2 * height).reshape(-1, 3)
    pixels = width * view_height
    splat: list[tuple] = []
    gather: list[tuple] = []
    for k, camera in enumerate(cameras):
        xy, seen = project_directions(camera, dirs)
        cells = np.flatnonzero(seen)
        xy = xy[cells]
        taps, tap_weights = _grid_taps(xy[:, 0], xy[:, 1], width, view_height, False)
        weight = border_weight(xy, width, view_height, feather).astype(np.float32)
        keep = weight > 0
        splat.append(tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (
            np.full(keep.sum(), k), cells[keep], taps[keep] + k * pixels, tap_weights[keep], weight[keep])))
        x, y = equirect_pixel(camera.ray_directions().reshape(-1, 3), height, 2 * height)
        taps, tap_weights = _grid_taps(x, y, 2 * height, height, True)
        gather.append((k * pixels + np.arange(pixels), taps, tap_weights))
    return _assemble(len(cameras), view_height, width, height * 2 * height, splat, gather)


def _assemble(views: int, height: int, width: int, cells: int, splat: list[tuple], gather: list[tuple]) -> CanvasMap:
    def cat(parts: list, index: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        tensors = [torch.as_tensor(np.asarray(p[index]) if not isinstance(p[index], torch.Tensor) else p[index])
                   for p in parts]
        return torch.cat(tensors).to(dtype) if tensors else torch.zeros(shape, dtype=dtype)

    return CanvasMap(
        views, height, width, cells,
        cat(splat, 0, torch.long, (0,)), cat(splat, 1, torch.long, (0,)), cat(splat, 2, torch.long, (0, 4)),
        cat(splat, 3, torch.float32, (0, 4)), cat(splat, 4, torch.float32, (0,)),
        cat(gather, 0, torch.long, (0,)), cat(gather, 1, torch.long, (0, 4)), cat(gather, 2, torch.float32, (0, 4)),
    )
