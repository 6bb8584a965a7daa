"""Reading an untrusted ``.npz`` safely: its layout and every array header before any data.

A job arrives from the network, so before a single array is decompressed the archive must be
exactly one zip file (nothing before or after it), every member an ``.npy`` array whose header
declares a plain numeric dtype and a shape that matches the bytes it holds, and the whole
unpacked size within a limit. Only then does numpy load it (never with pickles). Only numpy and
the standard library are used: Blender's own Python imports this module.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from typing import IO

import numpy as np

from .validation import InputError

Source = bytes | str | os.PathLike
END_RECORD = b"PK\x05\x06"
LOCAL_HEADER = b"PK\x03\x04"
END_RECORD_SIZE = 22
MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ArrayHeader:
    """What an ``.npy`` member declares: its shape and dtype, and the bytes its data takes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def _open(source: Source) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")


def check_no_extra_bytes(handle: IO[bytes]) -> None:
    """The data is one zip archive from its first byte to its last: nothing prepended or appended.

    zipfile tolerates both (it looks for the archive's end record from the back), so garbage
    before or after an archive would otherwise be stored and passed on unnoticed.
    """
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if handle.read(4) not in (LOCAL_HEADER, END_RECORD):
        raise InputError("body", "is not an .npz file (it does not start with a zip header)")
    tail_start = max(0, size - END_RECORD_SIZE - MAX_COMMENT)
    handle.seek(tail_start)
    tail = handle.read()
    at = tail.rfind(END_RECORD)
    while at >= 0:
        comment = int.from_bytes(tail[at + 20:at + 22], "little")
        if at + END_RECORD_SIZE + comment == len(tail):
            return
        at = tail.rfind(END_RECORD, 0, at)
    raise InputError("body", "has bytes after the end of the .npz archive")


def read_headers(source: Source, max_bytes: int) -> dict[str, ArrayHeader]:
    """Every member's declared shape and dtype, checked against its size, without loading data."""
    with _open(source) as handle:
        check_no_extra_bytes(handle)
        handle.seek(0)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise InputError("body", f"is not an .npz file ({err})") from None
        with archive:
            infos = archive.infolist()
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise InputError("body", f"unpacks to {total} bytes, more than the limit of {max_bytes}")
            headers: dict[str, ArrayHeader] = {}
            for info in infos:
                name = _member_name(info.filename)
                if name in headers:
                    raise InputError("body", f"holds the array {name!r} twice")
                headers[name] = _array_header(archive, info, name)
    return headers


def load_arrays(source: Source, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of a checked archive (see :func:`read_headers`), read without pickles."""
    read_headers(source, max_bytes)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as archive:
            for name in archive.files:
                arrays[name] = archive[name]
    except ValueError as err:
        raise InputError("body", f"cannot be read as .npz ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InputError("body", f"cannot be read as .npz ({err})") from None
    return arrays


def _member_name(filename: str) -> str:
    if not filename.endswith(".npy"):
        raise InputError("body", f"member {filename!r} is not an .npy array")
    name = filename[:-4]
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 255:
        raise InputError("body", f"member name {filename!r} is empty, too long or holds control characters")
    return name


def _array_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> ArrayHeader:
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            header_size = member.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, TypeError) as err:
        raise InputError(name, f"is not a valid .npy array ({err})") from None
    if dtype.hasobject:
        raise InputError("body", f"array {name!r} holds pickled objects, which are refused")
    if dtype.kind not in "biuf":
        raise InputError(name, f"must be numeric, got dtype {dtype}")
    count = 1
    for side in shape:
        count *= int(side)
    nbytes = count * dtype.itemsize
    if header_size + nbytes != info.file_size:
        raise InputError(name, f"declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) but holds "
                               f"{info.file_size - header_size} bytes")
    return ArrayHeader(tuple(int(s) for s in shape), dtype, nbytes)
