"""A Radiance ``.hdr`` reader, to check what ``backend.imaging.hdr.write_hdr`` writes (the backend only writes them).

Reads flat and new-style run-length encoded scanlines (what other tools write), so the tests can
also check the writer's files against those of other tools.
"""

import re
from pathlib import Path

import numpy as np

from backend.validation import InputError

_RESOLUTION = re.compile(rb"^([-+])Y (\d+) \+X (\d+)$")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError("path", f"no such file: {path}")
    return path


def rgbe_decode(rgbe: np.ndarray) -> np.ndarray:
    """uint8 (..., 4) RGBE -> float32 (..., 3), at the middle of each 8-bit step (Radiance, Blender)."""
    exponent = rgbe[..., 3].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return ((rgbe[..., :3] + 0.5) * scale[..., None]).astype(np.float32)



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
