"""Admission: refuse at submission a job that could not fit, from its array headers and settings.

A job of a few kilobytes can declare views of 16384 x 16384 pixels or object ids up to 2^31 - 1;
run, it would exhaust the host's memory minutes later and take the server down. The checks here
use only what the archive declares (shapes and the JSON settings, see :mod:`backend.npz`), so
they run before any array is decompressed, plus one pass over the loaded object ids.

The memory estimate adds up what the pipelines hold per element, rounded up; it is a bound for
refusing the impossible, not a prediction of peak use.
"""

from __future__ import annotations

from typing import Any

from ..npz import ArrayHeader
from ..protocol import PanoramaJob, TextureJob
from ..validation import InputError
from .config import JobLimits

BYTES_PER_VIEW_PIXEL = 96  # depth, colour (uint8 and float), world positions, texel lookups, weights
BYTES_PER_TEXEL = 64  # colour and weight accumulators, the written image, the chart mask
BYTES_PER_TRIANGLE = 256  # indices, UVs, the atlas, rasterisation buffers
BYTES_PER_VERTEX = 64
BYTES_PER_PANORAMA_PIXEL = 64  # equirect float colour, HDR conversion, the written files
PANORAMA_VIEWS = 8
TEXTURE_ARRAYS = ("vertices", "triangles", "object_ids", "uvs", "occluder_vertices", "occluder_triangles")


class TooLarge(InputError):
    """A job over a server limit: answered 413, naming the field."""


def admit_header(headers: dict[str, ArrayHeader], meta: dict[str, Any], limits: JobLimits) -> None:
    """Refuse, from declared shapes and settings alone, a job over a limit (raises :class:`TooLarge`)."""
    kind = meta.get("kind")
    if kind == TextureJob.kind:
        estimate = _texture_estimate(headers, meta, limits)
    elif kind == PanoramaJob.kind:
        estimate = _panorama_estimate(meta, limits)
    else:
        return  # read_job names the bad kind
    if estimate > limits.max_job_bytes:
        raise TooLarge("job", f"would need about {estimate / 2**30:.1f} GiB of memory, more than this server's "
                              f"limit of {limits.max_job_bytes / 2**30:.1f} GiB; use fewer or smaller views, "
                              f"a smaller texture or a simpler mesh")


def admit_job(job: TextureJob | PanoramaJob, limits: JobLimits) -> None:
    """The checks that need array values: object ids (each id is an object the job allocates for)."""
    if not isinstance(job, TextureJob):
        return
    if job.mesh.object_ids.size and int(job.mesh.object_ids.min()) < 0:
        raise InputError("object_ids", "must be >= 0")
    objects = job.mesh.num_objects if job.mesh.object_ids.size else 0
    if objects > limits.max_objects:
        raise TooLarge("object_ids", f"name {objects} objects, more than this server's limit of {limits.max_objects}")
    if len(job.object_names) > limits.max_objects:
        raise TooLarge("object_names", f"lists {len(job.object_names)} names, more than this server's limit of "
                                       f"{limits.max_objects}")


def _texture_estimate(headers: dict[str, ArrayHeader], meta: dict[str, Any], limits: JobLimits) -> int:
    depths = headers.get("depths")
    views = height = width = 0
    if depths is not None and len(depths.shape) == 3:
        views, height, width = depths.shape
    elif "K" in headers and headers["K"].shape:
        views = headers["K"].shape[0]
    _at_most("cameras", views, limits.max_views, "views")
    _at_most("depths", max(height, width), limits.max_view_side, "pixels on a side")
    _at_most("depths", height * width, limits.max_view_pixels, "pixels per view")
    size = meta.get("texture_size", 1024)
    size = size if isinstance(size, int) and not isinstance(size, bool) else 0
    _at_most("texture_size", size, limits.max_texture_size, "texels on a side")
    triangles = sum(_rows(headers, name) for name in ("triangles", "occluder_triangles"))
    vertices = sum(_rows(headers, name) for name in ("vertices", "occluder_vertices"))
    _at_most("triangles", triangles, limits.max_triangles, "triangles")
    _at_most("vertices", vertices, limits.max_vertices, "vertices")
    mesh_bytes = sum(headers[name].nbytes for name in TEXTURE_ARRAYS if name in headers)
    return (views * height * width * BYTES_PER_VIEW_PIXEL + size * size * BYTES_PER_TEXEL
            + triangles * BYTES_PER_TRIANGLE + vertices * BYTES_PER_VERTEX + mesh_bytes)


def _panorama_estimate(meta: dict[str, Any], limits: JobLimits) -> int:
    height, view = meta.get("equirect_height", 1024), meta.get("view_size", 512)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, view)):
        return 0  # read_job names the field
    _at_most("equirect_height", height, limits.max_texture_size, "pixels high")
    _at_most("view_size", view, limits.max_view_side, "pixels on a side")
    return 2 * height * height * BYTES_PER_PANORAMA_PIXEL + PANORAMA_VIEWS * view * view * BYTES_PER_VIEW_PIXEL


def _rows(headers: dict[str, ArrayHeader], name: str) -> int:
    header = headers.get(name)
    return header.shape[0] if header is not None and header.shape else 0


def _at_most(field: str, value: int, limit: int, unit: str) -> None:
    if value > limit:
        raise TooLarge(field, f"{value} {unit} is more than this server's limit of {limit}")

