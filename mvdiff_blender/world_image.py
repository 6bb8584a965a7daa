"""The image a 360 World is made around: a photo (an 8-bit image in the file) or the scene's render.

The backend keeps it as the World's front view (facing +X, the panorama's centre) and generates
the rest around it. Blender holds pixels as float RGBA rows from the bottom; the wire format wants
uint8 sRGB rows from the top, converted here once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import bpy
import numpy as np


class WorldImageError(ValueError):
    """No usable image; the message names what to change."""


def world_image(context, settings) -> np.ndarray | None:
    """uint8 (H, W, 3) for the chosen source, None when the World is made from text alone."""
    if settings.world_source == "IMAGE":
        if settings.world_image is None:
            raise WorldImageError("Choose the image the World is made around (Image)")
        return image_pixels(settings.world_image)
    if settings.world_source == "RENDER":
        return render_pixels(context.scene)
    return None


def image_pixels(image: bpy.types.Image) -> np.ndarray:
    """An 8-bit image's sRGB pixels, row 0 at the top (float images would need the display transform)."""
    width, height = image.size  # reading .size loads the pixels
    if width == 0 or height == 0:
        raise WorldImageError(f"The image {image.name!r} has no pixels (is its file missing?)")
    if image.is_float:
        raise WorldImageError(f"The image {image.name!r} holds float (HDR) pixels: use an 8-bit photo (PNG, JPEG)")
    pixels = np.empty(width * height * image.channels, np.float32)
    image.pixels.foreach_get(pixels)
    pixels = pixels.reshape(height, width, image.channels)[::-1]
    rgb = pixels[..., :3] if image.channels >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    return np.ascontiguousarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))


def render_pixels(scene: bpy.types.Scene) -> np.ndarray:
    """Render the scene's camera with its own settings into an 8-bit PNG and read it back.

    Only the output path and file format are changed for the render, and both are put back.
    """
    if scene.camera is None:
        raise WorldImageError("The scene has no active camera to render the World's front view from")
    render, settings = scene.render, scene.render.image_settings
    saved = (render.filepath, settings.file_format, settings.color_mode, settings.color_depth)
    folder = Path(tempfile.mkdtemp(prefix="mvdiff-front-"))
    path = folder / "front.png"
    try:
        render.filepath = str(path)
        settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGB", "8"
        bpy.ops.render.render(write_still=True, scene=scene.name)
        if not path.is_file():
            raise WorldImageError("The render wrote no image; render once with F12 to see why")
        image = bpy.data.images.load(str(path), check_existing=False)
        try:
            return image_pixels(image)
        finally:
            bpy.data.images.remove(image)
    finally:
        render.filepath = saved[0]
        settings.file_format, settings.color_mode, settings.color_depth = saved[1:]
        path.unlink(missing_ok=True)
        folder.rmdir()
