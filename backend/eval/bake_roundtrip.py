"""Bake the demo room's ground truth back from rendered views and measure what came back.

The texture baked from views of a known texture should re-render like the ground truth at
poses that took no part in the bake. This is the bake's end-to-end check (used by the
benchmark and the demo): it exercises the UV atlas, the texel rasteriser, visibility,
blending, the fill and the padding together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..geometry.bake import BakeResult, BakeSettings, TexelChunks, View, bake, visible_texels
from ..geometry.render import render_textured
from ..scenes.demo_room import TexturedRoom, textured_demo_room, trajectory
from ..validation import positive_int
from .texture_metrics import heldout_psnr, texture_coverage


@dataclass
class RoundTrip:
    room: TexturedRoom
    views: list[View]
    heldout: list[View]
    result: BakeResult
    psnr_db: float
    psnr_per_view: list[float]
    coverage: float
    seconds: dict[str, float] = field(default_factory=dict)


def bake_roundtrip(
    texture_size: int = 1024,
    views: int = 24,
    heldout: int = 8,
    width: int = 256,
    height: int = 192,
    settings: BakeSettings | None = None,
) -> RoundTrip:
    """Render ``views`` poses of the textured demo room, bake them, score ``heldout`` other poses.

    Held-out poses lie half-way between consecutive baking poses on the same loop, so they see
    the same parts of the room from positions the bake never used.
    """
    texture_size = positive_int("texture_size", texture_size)
    views = positive_int("views", views)
    heldout = min(positive_int("heldout", heldout), views)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    room = textured_demo_room(texture_size)
    chunks = TexelChunks(room.surface)
    seconds["atlas"] = time.perf_counter() - start

    start = time.perf_counter()
    bake_views = [_render(room, camera) for camera in trajectory(views, width=width, height=height)]
    between = trajectory(views, phase=0.5, width=width, height=height)
    picks = np.linspace(0, views - 1, heldout).round().astype(int)
    heldout_views = [_render(room, between[k]) for k in picks]
    seconds["render"] = time.perf_counter() - start

    start = time.perf_counter()
    result = bake(chunks, bake_views, settings, object_ids=room.atlas.mesh.object_ids)
    seconds["bake"] = time.perf_counter() - start

    start = time.perf_counter()
    visible = visible_texels(chunks, bake_views + heldout_views, settings)
    coverage = texture_coverage(result.seen, visible)
    psnr_db, per_view = heldout_psnr(
        room.atlas.mesh, result.texture_uint8(), [v.camera for v in heldout_views], [v.image for v in heldout_views]
    )
    seconds["evaluate"] = time.perf_counter() - start
    return RoundTrip(room, bake_views, heldout_views, result, psnr_db, per_view, coverage, seconds)


def _render(room: TexturedRoom, camera) -> View:
    rendered = render_textured(room.atlas.mesh, room.texture, camera)
    return View(rendered.image, camera, rendered.depth)
