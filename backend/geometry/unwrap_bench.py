"""``bench unwrap``: the isolated xatlas unwrap of a dense icosphere, and what the caller feels of it.

Reports the wall time of :func:`~backend.geometry.uv_atlas.ensure_uvs` (child start-up and array
transfer included), the child's peak resident memory, and the longest stall of a 10 ms
heartbeat thread in the calling process: with the unwrap in a child, the server's threads keep
running whatever xatlas does (it held the GIL for seconds when it ran in-process).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .child import ChildFailed
from .mesh import Mesh
from .uv_atlas import ensure_uvs

HEARTBEAT_SECONDS = 0.01


def run_unwrap_benchmark(subdivisions: int, resolution: int, padding: int = 4) -> dict:
    from ..scenes.shapes import icosphere

    mesh = Mesh(*icosphere([0.0, 0.0, 0.0], 1.0, subdivisions))
    gaps: list[float] = []
    stop = threading.Event()

    def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.wait(HEARTBEAT_SECONDS):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    start = time.perf_counter()
    try:
        atlas = ensure_uvs(mesh, resolution, padding)
        peak = atlas.unwrap_peak_bytes
        outcome, charts = "done", int(atlas.chart_ids.max()) + 1
        unplaced = int(np.count_nonzero(atlas.chart_ids < 0))
    except ChildFailed as err:
        outcome, charts, unplaced, peak = f"failed: {err}", None, None, err.peak_bytes
    seconds = time.perf_counter() - start
    stop.set()
    beat.join()
    return {
        "benchmark": "unwrap",
        "triangles": int(len(mesh.triangles)),
        "subdivisions": subdivisions,
        "resolution": resolution,
        "outcome": outcome,
        "charts": charts,
        "triangles_outside_charts": unplaced,
        "seconds": round(seconds, 2),
        "child_peak_mib": None if not peak else round(peak / 2**20, 1),
        "caller_longest_stall_seconds": round(max(gaps, default=0.0) - HEARTBEAT_SECONDS, 3),
    }
