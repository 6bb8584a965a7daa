"""Files a texturing job leaves in its output folder: texture, masks, frames, UVs, report.

Every file is written under a temporary name and renamed into place, so a reader polling the
folder (the worker, the add-on) never sees half a file: ``texture.png`` either exists whole or
not at all.

Pillow (and so imageio's default plugin) has no 16-bit RGB image mode: asked to write a
``uint16`` (H, W, 3) array it raises ``TypeError``, and older versions silently wrote 8 bits.
16-bit textures are therefore encoded here with zlib, which the PNG format needs and nothing
else; 8-bit images keep going through imageio.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from .. import atomic
from ..atomic import write_atomically
from ..geometry.mesh import Mesh

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BYTES_PER_PIXEL_16 = 6  # three big-endian uint16 samples


def texture_pixels(texture: np.ndarray, bits: int) -> np.ndarray:
    """A float texture in [0, 1] as uint8 or uint16 pixels (rounded to the nearest level)."""
    levels = 255.0 if bits == 8 else 65535.0
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.clip(np.rint(np.asarray(texture, np.float64) * levels), 0, levels).astype(dtype)


def write_texture(path: Path, texture: np.ndarray, bits: int) -> None:
    """Write a float [0, 1] RGB texture as an 8- or 16-bit-per-channel PNG."""
    pixels = texture_pixels(texture, bits)
    if bits == 8:
        write_atomically(path, lambda tmp: iio.imwrite(tmp, pixels, extension=".png"))
    else:
        data = encode_png16(pixels)
        atomic.write_bytes(path, data)


def encode_png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, bit depth 16) of uint16 (H, W, 3) pixels.

    Rows use the Sub filter (each byte minus the same byte of the pixel to its left), which
    turns smooth texture gradients into small numbers that deflate compresses well.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint16 (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    raw = pixels.astype(">u2").view(np.uint8).reshape(height, width * _BYTES_PER_PIXEL_16)
    filtered = raw.copy()
    filtered[:, _BYTES_PER_PIXEL_16:] -= raw[:, :-_BYTES_PER_PIXEL_16]  # wraps modulo 256, as PNG wants
    scanlines = np.concatenate([np.ones((height, 1), np.uint8), filtered], axis=1)  # filter type 1 (Sub)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"".join([
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)),
        _chunk(b"IEND", b""),
    ])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_mask(path: Path, mask: np.ndarray) -> None:
    """A boolean mask as an 8-bit grey PNG, 255 where true."""
    pixels = np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)
    write_atomically(path, lambda tmp: iio.imwrite(tmp, pixels, extension=".png"))


def write_frames(folder: Path, frames: Sequence[np.ndarray], check: Callable[[], None] | None = None) -> list[Path]:
    """Every generated frame as ``frame_0000.png``... in trajectory order; ``check`` runs before each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        if check is not None:
            check()
        path = folder / f"frame_{index:04d}.png"
        write_atomically(path, lambda tmp, image=frame: iio.imwrite(tmp, image, extension=".png"))
        paths.append(path)
    return paths


def object_names(names: Sequence[str], count: int) -> list[str]:
    """The job's object names, or ``object_0``, ``object_1``... when it sent none."""
    return list(names) if names else [f"object_{k}" for k in range(count)]


def object_uvs(mesh: Mesh, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per object, the corner UVs (its triangles, 3, 2) float32 in the order of its triangles in ``mesh``.

    The add-on exported the objects' triangles in this order, so it can write each array
    straight into a new UV layer of its object.
    """
    if mesh.uvs is None:
        raise ValueError("the mesh has no UVs")
    names = object_names(names, mesh.num_objects)
    return {name: mesh.uvs[mesh.object_ids == k].astype(np.float32) for k, name in enumerate(names)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` holding ``arrays`` under any names (object names may be anything, "file" included).

    ``np.savez(path, **arrays)`` would clash with its own keyword arguments, so the archive is
    written the way numpy writes it, one ``name.npy`` member per array; ``np.load`` reads it.
    """
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    write_atomically(path, write)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic.write_json(path, data)
