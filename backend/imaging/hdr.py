"""HDR radiance from a generated (display-referred) panorama, its preview, and its two file formats.

A diffusion model paints what a camera would show after tone mapping: an sRGB image in [0, 1]
whose sun and lamps are clipped to white. A World background needs scene radiance instead: a
sky a little above 1 and a sun tens to hundreds of times brighter, or nothing casts a shadow.
:func:`inverse_tone_map` undoes the sRGB encoding exactly and then expands the highlights with a
smooth curve; :func:`tone_map_preview` is its forward operator, for an 8-bit preview.

Files: OpenEXR (float32 or half, through the ``OpenEXR`` package) and Radiance RGBE ``.hdr``,
written by hand as flat scanlines (every reader reads those; Blender reads the World's file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR

from ..validation import InputError, as_array, in_range

DEFAULT_PEAK = 100.0
DEFAULT_KNEE = 0.5
HALF_MAX = 65504.0
RGBE_MAX = float(np.ldexp(255.0 / 256.0, 127))  # the largest value an RGBE exponent byte can hold


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """The exact sRGB EOTF (IEC 61966-2-1): linear segment below 0.04045, a 2.4 power above."""
    return np.where(srgb <= 0.04045, srgb / 12.92, ((np.maximum(srgb, 0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """The inverse of :func:`srgb_to_linear`."""
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.maximum(linear, 0.0031308) ** (1 / 2.4) - 0.055)


def inverse_tone_map(ldr: np.ndarray, *, peak: float = DEFAULT_PEAK, knee: float = DEFAULT_KNEE) -> np.ndarray:
    """Display-referred sRGB (H, W, 3) in [0, 1] (or uint8) -> linear float32 radiance (H, W, 3).

    After the exact sRGB EOTF, each pixel's value ``v`` (its largest linear channel) goes through

    * ``E(v) = v`` for ``v <= knee``: shadows and mid-tones keep their linear values, so mid-grey
      and the overall exposure of the scene are those the model painted;
    * ``E(v) = knee + (1 - knee) * R^-1((v - knee) / (1 - knee))`` above, where
      ``R(x) = x (1 + x / w^2) / (1 + x)`` is Reinhard's extended operator with white point
      ``w = (peak - knee) / (1 - knee)``, and ``R^-1(y) = 2y / ((1 - y) + sqrt((1 - y)^2 + 4y / w^2))``
      is its inverse (Banterle et al.'s expand operator, written in a form without cancellation).

    ``R`` has slope 1 at 0, so ``E`` is continuous with a continuous slope at the knee; ``R`` is
    increasing and concave for ``w >= 1``, so ``E`` is increasing and convex, maps 0 to 0 and white
    to ``peak``, and stays gentle until the last few percent below white, which it stretches up to
    ``peak``: exactly the clipped suns and lamps. All three channels are scaled by ``E(v) / v``,
    keeping hue and saturation (a clipped orange sun stays orange, where a luminance-based curve
    would barely expand it), and no channel exceeds ``peak``.

    ``peak`` (>= 1): the radiance pure white becomes (100: a sun about two orders of magnitude
    above a sky near 1). ``knee`` in [0, 0.95]: the linear value where expansion starts (0.5 is
    sRGB 0.74; 0 gives Banterle's plain inverse Reinhard, which brightens mid-tones too).
    """
    peak, knee = _curve("peak", peak, "knee", knee)
    srgb = _image("ldr", ldr, display=True)
    linear = srgb_to_linear(srgb)
    value = linear.max(axis=-1)
    white = (peak - knee) / (1.0 - knee)
    y = np.clip((value - knee) / (1.0 - knee), 0.0, 1.0)
    shoulder = 2.0 * y / ((1.0 - y) + np.sqrt((1.0 - y) ** 2 + 4.0 * y / white**2))
    expanded = np.where(value <= knee, value, knee + (1.0 - knee) * shoulder)
    scale = np.divide(expanded, value, out=np.ones_like(value), where=value > 0)
    return (linear * scale[..., None]).astype(np.float32)


def tone_map_preview(radiance: np.ndarray, *, peak: float = DEFAULT_PEAK, knee: float = DEFAULT_KNEE) -> np.ndarray:
    """Linear radiance (H, W, 3) -> uint8 sRGB, the forward operator of :func:`inverse_tone_map`.

    With the same parameters it gives back the image that was expanded (to 8-bit rounding);
    radiance above ``peak`` clips to white.
    """
    peak, knee = _curve("peak", peak, "knee", knee)
    linear = _image("radiance", radiance)
    value = linear.max(axis=-1)
    white = (peak - knee) / (1.0 - knee)
    x = np.maximum(value - knee, 0.0) / (1.0 - knee)
    shoulder = x * (1.0 + x / white**2) / (1.0 + x)
    compressed = np.minimum(np.where(value <= knee, value, knee + (1.0 - knee) * shoulder), 1.0)
    scale = np.divide(compressed, value, out=np.zeros_like(value), where=value > 0)
    display = linear_to_srgb(np.clip(linear * scale[..., None], 0.0, 1.0))
    return np.clip(np.rint(display * 255.0), 0, 255).astype(np.uint8)


def write_exr(path: str | Path, rgb: np.ndarray, *, half: bool = False) -> None:
    """RGB radiance as a ZIP-compressed scanline OpenEXR, float32 or (``half``) float16.

    Half floats stop at 65504; larger values are clipped there rather than becoming infinite.
    """
    pixels = _image("rgb", rgb)
    pixels = np.minimum(pixels, HALF_MAX).astype(np.float16) if half else pixels.astype(np.float32)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"RGB": np.ascontiguousarray(pixels)}) as exr:
        exr.write(str(path))


def read_exr(path: str | Path) -> np.ndarray:
    """float32 (H, W, 3) from an OpenEXR's R, G, B channels (plain or in one layer), or Y for grey."""
    path = _existing(path)
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            channels = {name: np.asarray(channel.pixels) for name, channel in exr.channels().items()}
    except Exception as err:  # the binding raises plain RuntimeErrors for unreadable files
        raise InputError("path", f"{path} cannot be read as OpenEXR ({err})") from None
    by_suffix: dict[str, np.ndarray] = {}
    for name in sorted(channels):
        by_suffix.setdefault(name.rsplit(".", 1)[-1], channels[name])
    if all(c in by_suffix for c in "RGB"):
        planes = [by_suffix[c] for c in "RGB"]
    elif "Y" in by_suffix:
        planes = [by_suffix["Y"]] * 3
    else:
        raise InputError("path", f"{path} has no R, G, B (or Y) channels, only {', '.join(sorted(channels))}")
    return np.stack(planes, axis=-1).astype(np.float32)


def rgbe_encode(rgb: np.ndarray) -> np.ndarray:
    """float (H, W, 3) >= 0 -> uint8 (H, W, 4) shared-exponent RGBE, truncating as Radiance does.

    Each channel keeps 8 bits relative to the pixel's largest channel ``v``: the decoded error is
    at most ``v / 256``. Values below 1e-32 become the black pixel (0, 0, 0, 0).
    """
    rgb = np.minimum(np.asarray(rgb, dtype=np.float64), RGBE_MAX)
    value = rgb.max(axis=-1)
    mantissa, exponent = np.frexp(value)
    ratio = np.divide(rgb, value[..., None], out=np.zeros_like(rgb), where=value[..., None] > 0)
    out = np.zeros(value.shape + (4,), np.uint8)
    out[..., :3] = np.floor(ratio * (mantissa * 256.0)[..., None])  # the largest channel: >= 128
    out[..., 3] = np.clip(exponent + 128, 0, 255)
    out[value < 1e-32] = 0
    return out


def write_hdr(path: str | Path, rgb: np.ndarray) -> None:
    """RGB radiance as a Radiance ``.hdr``: the standard header, then flat (unencoded) RGBE rows.

    Flat rows are valid in every reader (Radiance, Blender, imageio, stb_image) and cannot be
    mistaken for run-length encoded ones: those start with (2, 2, n < 128), and a pixel whose
    largest channel byte is always >= 128 never does.
    """
    pixels = _image("rgb", rgb)
    height, width = pixels.shape[:2]
    header = f"#?RADIANCE\n# mvdiff-blender\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n"
    Path(path).write_bytes(header.encode("ascii") + rgbe_encode(pixels).tobytes())


def _curve(peak_field: str, peak: float, knee_field: str, knee: float) -> tuple[float, float]:
    return in_range(peak_field, peak, 1.0, 1.0e6), in_range(knee_field, knee, 0.0, 0.95)


def _image(field: str, image: object, display: bool = False) -> np.ndarray:
    """A non-empty float64 (H, W, 3) image, finite and >= 0 (<= 1 too for display values; uint8 / 255)."""
    arr = as_array(field, image, shape=(None, None, 3), dtype=None)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(field, f"is empty ({arr.shape[1]} x {arr.shape[0]})")
    if display and arr.dtype == np.uint8:
        return arr / 255.0
    arr = arr.astype(np.float64)
    if arr.min() < 0:
        raise InputError(field, f"must be >= 0, found {arr.min():g}")
    if display and arr.max() > 1.0:
        raise InputError(field, f"display values must lie in [0, 1] (uint8 is divided by 255), found {arr.max():g}")
    return arr


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError("path", f"no such file: {path}")
    return path
