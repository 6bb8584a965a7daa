"""Files that appear whole or not at all: written beside their place, then renamed over it.

Job outputs, the job store, training state, weights and the add-on's own records are all read by
another process while they may be written (Blender polls a job's folder, a restarted server reads
its store), so no reader may ever see half a file. Standard library only: the add-on uses it too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a new temporary file in ``path``'s folder, then rename it to ``path``.

    The temporary file keeps ``path``'s suffix (writers that pick a format by it still can) and
    is removed if ``write`` fails, leaving whatever ``path`` held before.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """``durable``: on disk before the rename, so a crash right after leaves the new content, not none."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())

    return write_atomically(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Strict JSON (NaN and infinities are refused: other readers reject them) with a final newline."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def json_number(value: float | None, digits: int | None = None) -> float | None:
    """A report's number as :func:`write_json` accepts it: rounded to ``digits``, None when not finite."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits) if digits is not None else float(value)
