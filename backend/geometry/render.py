"""Reference renderer: textured meshes seen through a camera, with exact occlusion.

Tests and benchmarks use it to make ground-truth views of a textured scene (what a perfect
texture would look like from each camera) and to check bakes by rendering them back. It is
unlit: a pixel shows the texture colour of the visible surface, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import InputError, as_array
from .cameras import Camera
from .mesh import Mesh
from .raster import rasterize_view


@dataclass(frozen=True, eq=False)
class RenderedView:
    """``image`` uint8 (H, W, 3) sRGB, row 0 at the top; ``depth`` float32 (H, W) planar z, 0 for
    background; ``triangle`` int32 (H, W), -1 for background."""

    image: np.ndarray
    depth: np.ndarray
    triangle: np.ndarray


def render_textured(
    mesh: Mesh, texture: np.ndarray, camera: Camera, background: tuple[int, int, int] = (0, 0, 0)
) -> RenderedView:
    """Render ``mesh`` with ``texture`` in the atlas layout (row 0 = top = v 1), bilinearly sampled.

    ``texture`` is (S, S, 3) uint8 or float in [0, 1] (non-square works the same way);
    ``background`` is an sRGB colour with 0-255 channels for pixels that see nothing.
    """
    if not isinstance(mesh, Mesh):
        raise InputError("mesh", f"must be a Mesh, got {type(mesh).__name__}")
    if mesh.uvs is None:
        raise InputError("mesh", "has no UVs to look the texture up with")
    texture = _texture_as_float(texture)
    fill = as_array("background", background, shape=(3,), dtype=np.float64)
    if fill.min() < 0 or fill.max() > 255:
        raise InputError("background", f"channels must lie in [0, 255], got {tuple(fill)}")
    raster = rasterize_view(mesh, camera)
    hit = raster.covered
    image = np.empty((camera.height, camera.width, 3), np.uint8)
    image[...] = np.round(fill).astype(np.uint8)
    uv = raster.interpolate(mesh.uvs)
    colours = sample_texture(texture, uv[hit])
    image[hit] = np.clip(np.round(colours * 255.0), 0, 255).astype(np.uint8)
    return RenderedView(image, raster.depth, raster.triangle)


def render_depth(mesh: Mesh, camera: Camera) -> np.ndarray:
    """Planar depth float32 (H, W) as Blender would render it for this camera, 0 where empty."""
    return rasterize_view(mesh, camera).depth


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a float (H, W, C) texture at UVs (..., 2); returns (..., C) float32.

    Texel centres sit at u = (j + 0.5) / W, v = 1 - (i + 0.5) / H, as in ``rasterize_uv``; the
    lookup clamps at the borders rather than wrapping, since atlases do not tile.
    """
    height, width = texture.shape[:2]
    uv = np.asarray(uv, np.float64)
    x = np.clip(uv[..., 0] * width - 0.5, 0.0, width - 1.0)
    y = np.clip((1.0 - uv[..., 1]) * height - 0.5, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros(x.shape, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros(y.shape, np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx = (x - x0).astype(np.float32)[..., None]
    fy = (y - y0).astype(np.float32)[..., None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_as_float(texture: object) -> np.ndarray:
    arr = np.asarray(texture)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError("texture", f"expected shape (S, S, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind != "f":
        raise InputError("texture", f"must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    arr = as_array("texture", arr, dtype=np.float32)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InputError("texture", f"float values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]")
    return arr
