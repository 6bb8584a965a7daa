"""HDR radiance from a generated (display-referred) panorama, its preview, and its two file formats.

A diffusion model paints what a camera would show after tone mapping: an sRGB image in [0, 1]
whose sun and lamps are clipped to white. A World background needs scene radiance instead: a
sky a little above 1 and a sun tens to hundreds of times brighter, or nothing casts a shadow.
:func:`inverse_tone_map` undoes the sRGB encoding exactly and then expands the highlights with a
smooth curve; :func:`tone_map_preview` is its forward operator, for an 8-bit preview.

Files: OpenEXR (float32 or half, through the ``OpenEXR`` package) and Radiance RGBE ``.hdr``,
written by hand as flat scanlines and read flat or run-length encoded (what other tools write).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import OpenEXR

from ..validation import InputError, as_array, in_range

DEFAULT_PEAK = 100.0
DEFAULT_KNEE = 0.5
HALF_MAX = 65504.0
RGBE_MAX = float(np.ldexp(255.0 / 256.0, 127))  # the largest value an RGBE exponent byte can hold
_RESOLUTION = re.compile(rb"^([-+])Y (\d+) \+X (\d+)$")


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


def rgbe_decode(rgbe: np.ndarray) -> np.ndarray:
    """uint8 (..., 4) RGBE -> float32 (..., 3), at the middle of each 8-bit step (Radiance, Blender)."""
    exponent = rgbe[..., 3].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return ((rgbe[..., :3] + 0.5) * scale[..., None]).astype(np.float32)


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


def read_hdr(path: str | Path) -> np.ndarray:
    """float32 (H, W, 3) radiance from a Radiance ``.hdr``, row 0 at the top.

    Reads flat scanlines and new-style run-length encoded ones (each row decides for itself),
    ``-Y`` and ``+Y`` row orders, and divides out any ``EXPOSURE`` the header records. Old-style
    (pre-1991) repeat runs and XYZE files are refused.
    """
    path = _existing(path)
    data = path.read_bytes()
    offset, height, width, bottom_up, exposure = _hdr_header(path, data)
    rgb = rgbe_decode(_scanlines(path, data, offset, height, width))
    rgb = rgb[::-1] if bottom_up else rgb
    return np.ascontiguousarray(rgb / np.float32(exposure) if exposure != 1.0 else rgb)


def _hdr_header(path: Path, data: bytes) -> tuple[int, int, int, bool, float]:
    """(offset of the pixels, height, width, rows bottom-up, exposure) of a Radiance header."""
    if not data.startswith(b"#?"):
        raise InputError("path", f"{path} is not a Radiance .hdr file (no '#?' signature)")
    lines, position = [], 0
    while True:
        end = data.find(b"\n", position, position + 4096)
        if end < 0:
            raise InputError("path", f"{path} has no complete Radiance header")
        line, position = data[position:end].strip(), end + 1
        if lines and line == b"":
            break
        lines.append(line)
    exposure = 1.0
    for line in lines[1:]:
        if line.startswith(b"FORMAT=") and line[7:] != b"32-bit_rle_rgbe":
            raise InputError("path", f"{path} is {line[7:].decode(errors='replace')}, only 32-bit_rle_rgbe is read")
        if line.startswith(b"EXPOSURE="):
            try:
                exposure *= float(line[9:])
            except ValueError:
                raise InputError("path", f"{path} has a bad EXPOSURE line") from None
    end = data.find(b"\n", position, position + 256)
    match = _RESOLUTION.match(data[position:end].strip()) if end >= 0 else None
    if match is None:
        raise InputError("path", f"{path}: only '-Y H +X W' and '+Y H +X W' resolution lines are read")
    height, width = int(match[2]), int(match[3])
    if height <= 0 or width <= 0 or not np.isfinite(exposure) or exposure <= 0:
        raise InputError("path", f"{path} has a bad size ({width} x {height}) or exposure ({exposure})")
    return end + 1, height, width, match[1] == b"+", exposure


def _scanlines(path: Path, data: bytes, offset: int, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 4) RGBE rows, each flat or new-style run-length encoded."""
    encodable = 8 <= width <= 0x7FFF
    shortest_row = min(4 * width, 4 + 8 * -(-width // 128)) if encodable else 4 * width
    if len(data) - offset < height * shortest_row:  # checked before allocating what the header claims
        raise InputError("path", f"{path} is truncated ({width} x {height} announced)")
    buffer = np.frombuffer(data, np.uint8)
    out = np.empty((height, width, 4), np.uint8)
    position = offset
    for row in range(height):
        head = data[position : position + 4]
        if encodable and len(head) == 4 and head[0] == 2 and head[1] == 2 and head[2] < 128:
            if (head[2] << 8) | head[3] != width:
                raise InputError("path", f"{path}: row {row} is encoded for a width other than {width}")
            position = _rle_row(path, data, buffer, position + 4, out[row])
        else:
            end = position + 4 * width
            if end > len(data):
                raise InputError("path", f"{path} is truncated at row {row} of {height}")
            out[row] = buffer[position:end].reshape(width, 4)
            position = end
    return out


def _rle_row(path: Path, data: bytes, buffer: np.ndarray, position: int, row: np.ndarray) -> int:
    """Decode one new-style row into ``row`` (W, 4), channel after channel; the next offset."""
    width, size = row.shape[0], len(data)
    for channel in range(4):
        column = 0
        while column < width:
            if position >= size:
                raise InputError("path", f"{path} is truncated inside a run-length encoded row")
            count = data[position]
            if count > 128:  # a run: one byte repeated count - 128 times
                count -= 128
                if column + count > width or position + 1 >= size:
                    raise InputError("path", f"{path} has a run past the end of a row")
                row[column : column + count, channel] = data[position + 1]
                position += 2
            else:  # count literal bytes
                if count == 0 or column + count > width or position + 1 + count > size:
                    raise InputError("path", f"{path} has a bad literal run in a row")
                row[column : column + count, channel] = buffer[position + 1 : position + 1 + count]
                position += 1 + count
            column += count
    return position


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
