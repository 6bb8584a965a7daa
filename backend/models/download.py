"""Download a checkpoint from a plain HTTPS link, safely: standard library ``urllib`` and tqdm.

The released checkpoints are a few GB each on Dropbox, which answers a wrong link with an HTML
page and whose connections can drop. So a download:

* streams into ``NAME.partial`` and renames it to ``NAME`` only once complete and checked, so
  nothing half-written ever sits under the final name;
* resumes an existing ``.partial`` with an HTTP ``Range`` request, and starts over cleanly when
  the server ignores the range (answers 200 with the whole file) or refuses it (416);
* checks the size against ``Content-Length`` / ``Content-Range`` and the catalog's expected size;
* refuses an HTML page (``Content-Type: text/html`` or a body opening with ``<!DOCTYPE`` /
  ``<html``) and deletes it;
* records the finished file's sha256 in the models folder's manifest (:mod:`.manifest`);
* when the connection is cut, keeps the ``.partial`` and says that running the same command
  again resumes it.

Every failure raises ``InputError`` (field ``download``) with what happened and what to do.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from ..validation import InputError
from . import manifest

FIELD = "download"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "mvdiff-blender-backend"
HTML_OPENINGS = (b"<!doctype", b"<html")
PARTIAL_SUFFIX = ".partial"
Progress = Callable[[int, "int | None"], None]
ONLINE_HINT = (
    "check the network connection (in Blender: Edit > Preferences > System > Network > Allow Online Access)"
)


@dataclass
class Downloaded:
    """A finished download: where it is, its sha256 and size, and whether it resumed a ``.partial``."""

    path: Path
    sha256: str
    size: int
    resumed: bool


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    on_progress: Progress | None = None,
) -> Downloaded:
    """Download ``url`` to ``dest`` (resuming ``dest.partial``), check it and record its sha256.

    ``progress`` shows a tqdm bar on stderr; ``on_progress(bytes_so_far, total_or_None)`` is called
    after each block, for callers that show progress their own way (the Blender add-on).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    resumed = partial.is_file() and partial.stat().st_size > 0
    size = _fetch(url, partial, expected_size, progress, timeout, on_progress)
    if expected_size is not None and size != expected_size:
        partial.unlink(missing_ok=True)
        raise InputError(
            FIELD, f"{url} gave {size} bytes, but {dest.name} is {expected_size} bytes; the download was deleted, "
            "try again later (the link may have changed)",
        )
    sha256 = manifest.sha256_of(partial)
    os.replace(partial, dest)
    manifest.record(dest, sha256, url)
    return Downloaded(dest, sha256, size, resumed)


def _fetch(
    url: str, partial: Path, expected_size: int | None, progress: bool, timeout: float, on_progress: Progress | None
) -> int:
    """Stream ``url`` into ``partial`` (appending from its current size when possible); return its final size."""
    for _attempt in range(2):  # a second try only after throwing away a .partial the server would not resume
        offset = partial.stat().st_size if partial.is_file() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # the range is past the end: the .partial is not this file's start
                partial.unlink()
                continue
            raise InputError(FIELD, f"{url} answered HTTP {err.code} {err.reason}; check the link") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(FIELD, f"cannot reach {_host(url)} ({reason}); {ONLINE_HINT}") from None
        with response:
            start, total = _range_of(response, offset)
            if start != offset:  # the server ignored or misread the range: start over from byte 0
                partial.unlink(missing_ok=True)
                offset = 0
            _refuse_html(response.headers.get("Content-Type", ""), url, partial)
            if expected_size is not None and total is not None and total != expected_size:
                partial.unlink(missing_ok=True)
                raise InputError(
                    FIELD, f"{url} announces {total} bytes, but {partial.name.removesuffix(PARTIAL_SUFFIX)} is "
                    f"{expected_size} bytes; nothing was kept, check the link",
                )
            size = _stream(response, partial, offset, total, url, progress, on_progress)
        if total is not None and size < total:  # the stream ended early without an error: a cut all the same
            raise InputError(FIELD, _cut_message(url, size, total, partial, "connection closed"))
        if total is not None and size > total:
            partial.unlink(missing_ok=True)
            raise InputError(
                FIELD, f"{url} sent {size} bytes where it announced {total}; the download was deleted, try again",
            )
        return size
    raise InputError(FIELD, f"{url} refused to resume and then to start over; try again later")


def _range_of(response, offset: int) -> tuple[int, int | None]:
    """(first byte sent, total file size or None) from the status and ``Content-Range`` / ``Content-Length``."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None:
            return -1, None  # unusable: start over
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    return 0, int(length) if length and length.isdigit() else None


def _refuse_html(content_type: str, url: str, partial: Path) -> None:
    if content_type.split(";")[0].strip().lower() == "text/html":
        partial.unlink(missing_ok=True)
        raise InputError(FIELD, _html_message(url))


def _html_message(url: str) -> str:
    hint = " (a Dropbox link needs dl=1, not dl=0)" if "dl=0" in url else ""
    return (
        f"{url} answered with a web page, not the file{hint}; nothing was kept. The link may have moved: "
        "download the file in a browser and put it into the models folder"
    )


def _stream(
    response, partial: Path, offset: int, total: int | None, url: str, progress: bool, on_progress: Progress | None
) -> int:
    from tqdm import tqdm

    size = offset
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               desc=partial.name.removesuffix(PARTIAL_SUFFIX), disable=not progress, dynamic_ncols=True)
    try:
        with open(partial, "ab" if offset else "wb") as handle:
            first = True
            while True:
                try:
                    block = response.read(CHUNK)
                except (HTTPException, OSError) as err:
                    handle.flush()
                    raise InputError(FIELD, _cut_message(url, size, total, partial, type(err).__name__)) from None
                if not block:
                    break
                if first and offset == 0 and block.lstrip()[:9].lower().startswith(HTML_OPENINGS):
                    handle.close()
                    partial.unlink(missing_ok=True)
                    raise InputError(FIELD, _html_message(url))
                first = False
                handle.write(block)
                size += len(block)
                bar.update(len(block))
                if on_progress is not None:
                    on_progress(size, total)
    finally:
        bar.close()
    return size


def _cut_message(url: str, size: int, total: int | None, partial: Path, why: str) -> str:
    return (
        f"the connection to {_host(url)} was cut after {size} of {total if total is not None else '?'} bytes "
        f"({why}); the part already downloaded is kept in {partial}: run the same command again to resume"
    )


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).netloc or url
