"""Back-projection of views into a UV texture.

Every covered texel is a known surface point (``uv_atlas``/``raster.rasterize_uv``), so baking
is a pull: project the texel into each view, keep it if the view really sees it, weight it by
how squarely the view sees it, and blend. Unseen texels are then filled from the nearest seen
surface in 3D (not in UV: the nearest texel in UV can belong to another chart and another
object) and UV islands are padded so mipmapping never reaches the background.

Speed: texels are grouped into compact chunks (sorted by triangle) with 3D bounding boxes;
chunks outside a view's frustum are skipped, so each view only touches what it can see.
The per-view arithmetic runs in torch (float32, all cores, one ``grid_sample`` for colours).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from ..validation import InputError, depth_map, in_range, rgb_image
from .cameras import NEAR, Camera, frustum_sides, inside, pinhole
from .raster import TexelSurface

CHUNK_TEXELS = 1024


@dataclass(frozen=True)
class View:
    """One generated (or rendered) frame: sRGB image, its camera and its planar depth."""

    image: np.ndarray
    camera: Camera
    depth: np.ndarray


@dataclass(frozen=True)
class BakeSettings:
    """How views are blended.

    ``mode``: "blend" averages views weighted by ``cos(angle) ** power``; "best" takes each
    texel from the view that sees it most squarely (sharper, but seams where views disagree).
    ``min_cos``: grazing cut-off; views that see a surface at a flatter angle are ignored.
    ``depth_tolerance``: relative depth agreement for the visibility test, on top of the depth
    change a surface of that slope has over one pixel. ``padding``: texels of colour grown
    around UV islands (None fills the whole atlas).
    """

    mode: Literal["blend", "best"] = "blend"
    power: float = 4.0
    min_cos: float = 0.1
    depth_tolerance: float = 0.01
    padding: int | None = 8
    fill_unseen: bool = True


@dataclass(frozen=True)
class BakeResult:
    """``texture`` float32 (S, S, 3) sRGB in [0, 1], row 0 at the top (v = 1).

    ``seen``: covered texels that some view saw; ``filled``: covered texels coloured by the
    nearest-surface fill; ``padded``: gutter texels coloured by island padding.
    """

    texture: np.ndarray
    seen: np.ndarray
    filled: np.ndarray
    padded: np.ndarray

    def texture_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.texture * 255.0), 0, 255).astype(np.uint8)


class TexelChunks:
    """Covered texels in triangle order, cut into chunks with 3D bounding boxes.

    Built once per atlas and reused for every bake of that atlas (e.g. every job on a scene).
    """

    def __init__(self, surface: TexelSurface):
        flat = np.flatnonzero(surface.covered.ravel())
        order = np.argsort(surface.triangle.ravel()[flat], kind="stable")
        self.surface = surface
        self.index = flat[order]
        self.position = torch.from_numpy(np.ascontiguousarray(surface.position.reshape(-1, 3)[self.index], np.float32))
        self.normal = torch.from_numpy(np.ascontiguousarray(surface.normal.reshape(-1, 3)[self.index], np.float32))
        starts = np.arange(0, len(self.index), CHUNK_TEXELS)
        self.starts = starts
        self.ends = np.minimum(starts + CHUNK_TEXELS, len(self.index))
        pos = self.position.numpy()
        self.low = np.minimum.reduceat(pos, starts, axis=0)
        self.high = np.maximum.reduceat(pos, starts, axis=0)

    def texels_in_frustum(self, camera: Camera) -> torch.Tensor:
        """Indices (into the chunked order) of texels in chunks that touch the view frustum."""
        corners = np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(8, 3)
        boxes = np.where(corners[None], self.high[:, None], self.low[:, None])  # (C, 8, 3)
        world_to_cam = camera.world_to_cam
        p = boxes @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        planes = frustum_sides(camera.K, camera.width, camera.height, p)
        culled = (planes < 0).all(axis=1).any(axis=-1)
        keep = np.flatnonzero(~culled)
        if keep.size == 0:
            return torch.empty(0, dtype=torch.long)
        lengths = self.ends[keep] - self.starts[keep]
        offsets = np.repeat(self.starts[keep] - np.cumsum(lengths) + lengths, lengths)
        return torch.from_numpy(np.arange(lengths.sum()) + offsets)


def bake(
    surface: TexelSurface | TexelChunks,
    views: list[View],
    settings: BakeSettings | None = None,
    *,
    object_ids: np.ndarray | None = None,
    check: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BakeResult:
    """Blend ``views`` into the atlas whose texels ``surface`` describes (``raster.rasterize_uv``).

    ``object_ids`` (per triangle) keeps the unseen-texel fill within an object where the object
    was seen at all. Pass :class:`TexelChunks` instead of the surface to reuse the culling
    structure across bakes of the same atlas. ``check`` runs before every view and before the
    fill (raise to stop: a large atlas takes seconds per view); ``progress`` gets (views done,
    views).
    """
    settings = settings or BakeSettings()
    _check_settings(settings)
    chunks = _as_chunks(surface)
    surface = chunks.surface
    size = surface.size
    if not views:
        raise InputError("views", "need at least one view")
    checked = [_check_view(k, view) for k, view in enumerate(views)]

    count = len(chunks.index)
    colour_sum = torch.zeros(count, 3)
    weight_sum = torch.zeros(count)
    for number, (image, camera, depth) in enumerate(checked, start=1):
        if check is not None:
            check()
        texels = chunks.texels_in_frustum(camera)
        if progress is not None:
            progress(number, len(checked))
        if texels.numel() == 0:
            continue
        texels, colour, weight = _sample_view(texels, chunks, image, camera, depth, settings)
        if settings.mode == "blend":
            colour_sum.index_add_(0, texels, colour * weight[:, None])
            weight_sum.index_add_(0, texels, weight)
        else:
            better = weight > weight_sum[texels]
            colour_sum[texels[better]] = colour[better]
            weight_sum[texels[better]] = weight[better]

    seen_chunked = (weight_sum > 0).numpy()
    if settings.mode == "blend":
        colour_sum[seen_chunked] /= weight_sum[seen_chunked][:, None]
    texture = np.zeros((size * size, 3), np.float32)
    texture[chunks.index] = colour_sum.numpy()
    texture = texture.reshape(size, size, 3)
    seen = _scatter_mask(chunks, seen_chunked)

    filled = np.zeros_like(seen)
    if check is not None:
        check()
    if settings.fill_unseen and seen.any():
        filled = surface.covered & ~seen
        labels = None
        if object_ids is not None:
            labels = np.where(surface.covered, np.asarray(object_ids)[np.maximum(surface.triangle, 0)], -1)
        _fill_from_nearest_surface(texture, seen, filled, surface.position, labels)
    padded = _pad_islands(texture, surface.covered, settings.padding)
    return BakeResult(texture, seen, filled, padded)


def visible_texels(
    surface: TexelSurface | TexelChunks, views: list[View], settings: BakeSettings | None = None
) -> np.ndarray:
    """Covered texels that at least one of ``views`` sees, by the bake's own visibility test.

    This is the denominator of texture coverage: what some camera sees (in front, unoccluded,
    not beyond the grazing cut-off) and a bake from other cameras should therefore have seen.
    """
    return texels_seen_per_view(surface, views, settings)[0]


def texels_seen_per_view(
    surface: TexelSurface | TexelChunks,
    views: Iterable[View],
    settings: BakeSettings | None = None,
    *,
    check: Callable[[], None] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The texels some view sees (as :func:`visible_texels`) and how many each view sees.

    A view that sees no texel contributes nothing to a bake: its camera is inside an object,
    looks at back faces or at nothing at all. ``views`` may be a generator, so a long
    trajectory need not hold every image at once; ``check`` runs before every view.
    """
    settings = settings or BakeSettings()
    _check_settings(settings)
    chunks = _as_chunks(surface)
    seen = torch.zeros(len(chunks.index), dtype=torch.bool)
    counts = []
    for k, view in enumerate(views):
        if check is not None:
            check()
        image, camera, depth = _check_view(k, view)
        texels = chunks.texels_in_frustum(camera)
        if texels.numel():
            texels, _, _ = _sample_view(texels, chunks, image, camera, depth, settings)
            seen[texels] = True
        counts.append(int(texels.numel()))
    return _scatter_mask(chunks, seen.numpy()), counts


def _as_chunks(surface: TexelSurface | TexelChunks) -> TexelChunks:
    if isinstance(surface, TexelChunks):
        return surface
    if not isinstance(surface, TexelSurface):
        raise InputError("surface", f"must be a TexelSurface from rasterize_uv, got {type(surface).__name__}")
    if not surface.covered.any():
        raise InputError("surface", "no texel is covered by a UV triangle")
    return TexelChunks(surface)


def _scatter_mask(chunks: TexelChunks, values: np.ndarray) -> np.ndarray:
    size = chunks.surface.size
    mask = np.zeros(size * size, bool)
    mask[chunks.index[values]] = True
    return mask.reshape(size, size)


def _sample_view(texels: torch.Tensor, chunks: TexelChunks, image, camera: Camera, depth, settings: BakeSettings):
    """The texels among ``texels`` that the view sees, with their colours and weights (> 0).

    Colours are bilinear over the pixels whose depth agrees with the texel's (masked bilinear):
    an occluder's pixels never bleed onto the surface behind it, yet texels right next to a
    depth edge still get their colour from the pixels that do see them.
    """
    texels, taps, tap_weights, weight = view_taps(texels, chunks, camera, depth, settings)
    colour = (image[taps] * tap_weights[..., None]).sum(dim=1)
    return texels, colour, weight


def view_taps(texels: torch.Tensor, chunks: TexelChunks, camera: Camera, depth: torch.Tensor,
              settings: BakeSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How the view's pixels reach the texels it sees: the bake's sampling as a linear map.

    Returns the seen texels (n,), their four pixel taps (n, 4) into the view's flattened pixels,
    the tap weights (n, 4; bilinear over the depth-agreeing pixels, summing to 1) and the texels'
    blend weights (n,; ``cos ** power`` times the agreeing share of the footprint). ``depth`` is
    the view's flattened planar depth. Depends only on geometry, so a caller that samples many
    images through one camera (a denoising loop) computes it once.
    """
    position = chunks.position.index_select(0, texels)
    world_to_cam = torch.from_numpy(camera.world_to_cam.astype(np.float32))
    p = position @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = p[:, 2]
    K = camera.K
    x, y = pinhole(K, p[:, 0], p[:, 1], z.clamp_min(NEAR))
    width, height = camera.width, camera.height
    # Compact after each cheap test: many texels of a chunk that touches the frustum miss it.
    ok = (z > NEAR) & inside(torch.stack([x, y], -1), width, height)
    keep = ok.nonzero().squeeze(1)
    texels, position, z, x, y = (t.index_select(0, keep) for t in (texels, position, z, x, y))
    ray = position - torch.from_numpy(camera.center.astype(np.float32))
    cos = -(ray * chunks.normal.index_select(0, texels)).sum(dim=1) / ray.norm(dim=1).clamp_min(1e-9)
    keep = (cos >= settings.min_cos).nonzero().squeeze(1)
    texels, z, x, y, cos = (t.index_select(0, keep) for t in (texels, z, x, y, cos))

    x, y = x.clamp(0, width - 1), y.clamp(0, height - 1)
    x0 = x.floor().clamp(max=width - 2).long()
    y0 = y.floor().clamp(max=height - 2).long()
    fx, fy = x - x0, y - y0
    base = y0 * width + x0
    taps = torch.stack((base, base + 1, base + width, base + width + 1), dim=1)
    bilinear = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=1)
    # The depth a surface of this slope changes over about one pixel, on top of the tolerance.
    tan = torch.sqrt((1 - cos.clamp(max=1) ** 2).clamp_min(0)) / cos.clamp_min(1e-3)
    slack = z * (settings.depth_tolerance + 1.5 * tan / float(min(K[0, 0], K[1, 1])))
    seen_depth = depth[taps]
    agrees = (seen_depth > 0) & ((z[:, None] - seen_depth).abs() <= slack[:, None])
    tap_weights = torch.where(agrees, bilinear, torch.zeros_like(bilinear))
    agreement = tap_weights.sum(dim=1)
    # Most of the bilinear footprint must see this surface, else the texel sits behind an edge.
    keep = (agreement >= 0.5).nonzero().squeeze(1)
    agreement = agreement.index_select(0, keep)
    tap_weights = tap_weights.index_select(0, keep) / agreement[:, None]
    weight = cos.index_select(0, keep) ** settings.power * agreement
    return texels.index_select(0, keep), taps.index_select(0, keep), tap_weights, weight


def _check_view(index: int, view: View) -> tuple[torch.Tensor, Camera, torch.Tensor]:
    """Validate a view; return its colours (H*W, 3) in [0, 1], camera and depth (H*W,)."""
    if not isinstance(view.camera, Camera):
        raise InputError(f"views[{index}].camera", "must be a Camera")
    cam = view.camera
    if cam.width < 2 or cam.height < 2:
        raise InputError(f"views[{index}].camera", "views must be at least 2 x 2 pixels")
    image = rgb_image(f"views[{index}].image", view.image, cam.height, cam.width)
    depth = depth_map(f"views[{index}].depth", view.depth, cam.height, cam.width)
    colours = torch.from_numpy(image.reshape(-1, 3)).float().div_(255.0)
    return colours, cam, torch.from_numpy(depth.reshape(-1))


def _check_settings(settings: BakeSettings) -> None:
    if settings.mode not in ("blend", "best"):
        raise InputError("mode", f"must be 'blend' or 'best', got {settings.mode!r}")
    in_range("power", settings.power, 0.0, 64.0)
    in_range("min_cos", settings.min_cos, 0.0, 1.0)
    in_range("depth_tolerance", settings.depth_tolerance, 0.0, 1.0)
    if settings.padding is not None and (not isinstance(settings.padding, int) or settings.padding < 0):
        raise InputError("padding", f"must be a non-negative integer or None, got {settings.padding!r}")


def _fill_from_nearest_surface(texture, seen, unseen, position, labels) -> None:
    """Colour unseen texels from the nearest seen texel in 3D, within the same object if possible.

    Only seen texels on the border of seen regions can be nearest to an unseen one on the same
    surface, so the search tree holds just those. Unseen regions can be large (a ceiling no
    camera looked at), so the search runs for one texel per 2 x 2 block and its block
    neighbours copy the answer: charts lie ``padding`` texels apart, so a block never mixes
    charts unless it straddles a chart edge, and such texels are searched on their own.
    """
    border = seen & ~ndimage.binary_erosion(seen, border_value=0)
    rows, cols = np.nonzero(unseen)
    anchor_rows, anchor_cols = rows & ~1, cols & ~1
    same_chart = unseen[anchor_rows, anchor_cols]
    if labels is not None:
        same_chart &= labels[anchor_rows, anchor_cols] == labels[rows, cols]
    searched = np.zeros_like(unseen)
    searched[anchor_rows[same_chart], anchor_cols[same_chart]] = True
    searched[rows[~same_chart], cols[~same_chart]] = True

    groups = [(None, searched)]
    if labels is not None:
        groups = [(label, searched & (labels == label)) for label in np.unique(labels[searched])]
    for label, targets in groups:
        sources = border if label is None else border & (labels == label)
        if not sources.any():
            sources = border
        _, nearest = cKDTree(position[sources]).query(position[targets], workers=-1)
        texture[targets] = texture[sources][nearest]
    copy = same_chart & ((rows != anchor_rows) | (cols != anchor_cols))
    texture[rows[copy], cols[copy]] = texture[anchor_rows[copy], anchor_cols[copy]]


def _pad_islands(texture: np.ndarray, covered: np.ndarray, padding: int | None) -> np.ndarray:
    """Grow island colours into the gutter by ``padding`` texels (all of it when None)."""
    if covered.all() or not covered.any() or padding == 0:
        return np.zeros_like(covered)
    distance, (rows, cols) = ndimage.distance_transform_edt(~covered, return_indices=True)
    padded = ~covered if padding is None else (~covered & (distance <= padding))
    texture[padded] = texture[rows[padded], cols[padded]]
    return padded
