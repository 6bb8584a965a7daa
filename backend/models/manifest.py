"""The models folder's record of each checkpoint's sha256, kept in ``manifest.json``.

The released MVDiffusion checkpoints come with no published checksums, so the hash is taken
when a file is first downloaded (or first seen) and checked before every later load: a file
that changed since (a disk error, an interrupted copy over it, a different file under the same
name) is refused instead of loaded into the model as silently wrong weights.

The manifest is written atomically (a temporary file renamed over it), so a crash never leaves
it half-written. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..atomic import write_text
from ..validation import InputError

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """File name -> record (``sha256``, ``size``, ``url``, ``recorded``); empty when there is none yet."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            "manifest", f"{path} cannot be read ({err}); delete it and the hashes are taken again"
        ) from None
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def record(path: str | os.PathLike, sha256: str, url: str | None = None) -> dict:
    """Record ``path``'s hash in its folder's manifest (atomic write) and return the record."""
    path = Path(path)
    files = read_manifest(path.parent)
    entry = {"sha256": sha256, "size": path.stat().st_size, "url": url, "recorded": round(time.time())}
    files[path.name] = entry
    write_text(path.parent / MANIFEST, json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    return entry


def check(path: str | os.PathLike, field: str = "checkpoint") -> str:
    """Check ``path`` against its recorded sha256 (recording it when the file is new) and return the hash.

    A mismatch raises ``InputError`` naming the file and both hashes, with the fix.
    """
    path = Path(path)
    actual = sha256_of(path)
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        record(path, actual)
        return actual
    if entry.get("sha256") != actual:
        raise InputError(
            field,
            f"{path} has sha256 {actual}, but {entry.get('sha256')} was recorded when it was downloaded: the file "
            f"changed or is damaged. Delete it and download it again (python -m backend models download {path.name})",
        )
    return actual


def status(path: str | os.PathLike) -> str:
    """``ok``, ``mismatch`` or ``unrecorded``: what :func:`check` would find, for listings."""
    path = Path(path)
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        return "unrecorded"
    if entry.get("size") != path.stat().st_size:
        return "mismatch"
    return "ok" if entry.get("sha256") == sha256_of(path) else "mismatch"


