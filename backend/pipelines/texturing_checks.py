"""What the cameras of a texturing job can see, checked before any model runs.

A camera inside an object, or a closed mesh seen from outside whose normals face inward (a room
exported from the wrong side), sees only back faces: the bake ignores them, and the job would
otherwise end in "success" with an all-black texture. The same visibility test the bake uses
runs here on the depth maps alone, on a coarse atlas, so it costs a small part of a bake and
fails a hopeless job before the GPU work. Jobs that can still texture something carry warnings
in ``report.json`` naming the cameras that contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..geometry.bake import View, texels_seen_per_view
from ..geometry.raster import rasterize_uv
from ..geometry.uv_atlas import Atlas
from ..protocol import TextureJob
from ..validation import InputError

LOW_COVERAGE = 0.01
"""Below this share of the surfaces seen, the report warns that most of the texture is guessed."""
EMPTY_DEPTH_WARNING = 0.75
"""A camera whose depth map is empty (no surface, or beyond the clip range) over more than this share is named."""
CHECK_ATLAS_SIZE = 256  # texels: enough to tell "sees something" from "sees nothing" per camera


@dataclass(frozen=True)
class Visibility:
    """Per camera: the share of pixels without depth and the atlas texels it sees (at the check's size)."""

    empty_depth: list[float]
    texels_seen: list[int]
    coverage: float  # share of the atlas' covered texels that some camera sees

    @property
    def blind_cameras(self) -> list[int]:
        return [k for k, count in enumerate(self.texels_seen) if count == 0]

    def warnings(self, coverage: float) -> list[str]:
        """Sentences for ``report.json``: which cameras add nothing and why, given the bake's ``coverage``."""
        found = []
        no_depth = [k for k, share in enumerate(self.empty_depth) if share >= 1.0]
        if no_depth:
            found.append(f"{_cameras(no_depth)} hit no surface at all (nothing in view, or all of it beyond "
                         "the clip range)")
        blind = [k for k in self.blind_cameras if k not in no_depth]
        if blind:
            found.append(f"{_cameras(blind)} saw no textured surface from the front (a camera inside an object, "
                         "or surfaces whose normals face away), adding nothing to the texture")
        sparse = [k for k, share in enumerate(self.empty_depth) if EMPTY_DEPTH_WARNING < share < 1.0]
        if sparse:
            found.append(f"{_cameras(sparse)} had no depth over more than {EMPTY_DEPTH_WARNING:.0%} of the view "
                         "(empty background, or surfaces beyond the clip range)")
        if coverage < LOW_COVERAGE:
            found.append(f"the cameras saw only {coverage:.2%} of the textured surfaces; the rest of the "
                         "texture is filled from the nearest seen colour")
        return found


def check_visibility(
    job: TextureJob,
    atlas: Atlas,
    check: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Visibility:
    """What each camera sees of the atlas; raises InputError (field ``cameras``) when no camera sees anything.

    Only a job that cannot texture a single texel is refused: the check runs on a coarse atlas,
    where a camera that sees a sliver of a large scene may find no texel, so a camera that sees
    nothing here is only named in the warnings.
    """
    empty = [float(np.mean(depth <= 0)) for depth in job.depths]
    surface = rasterize_uv(atlas.mesh, min(CHECK_ATLAS_SIZE, job.texture_size), check=check)
    seen, counts = texels_seen_per_view(surface, _views(job, progress), check=check)
    covered = np.count_nonzero(surface.covered)
    visibility = Visibility(empty, counts, float(np.count_nonzero(seen) / covered) if covered else 0.0)
    if not any(counts):
        without_depth = [k for k, share in enumerate(empty) if share >= 1.0]
        why = f" ({_cameras(without_depth)} hit no surface at all)" if without_depth else ""
        raise InputError("cameras", f"no camera saw anything of the textured surfaces from the front{why}: a camera "
                         "inside an object, or a closed mesh seen from outside whose normals face inward, sees only "
                         "back faces, which cannot be textured")
    return visibility


def _views(job: TextureJob, progress: Callable[[int, int], None] | None) -> Iterator[View]:
    """Each camera with a blank image (only depth matters for visibility), reporting progress."""
    for k, (camera, depth) in enumerate(zip(job.cameras, job.depths, strict=True)):
        yield View(np.zeros((camera.height, camera.width, 3), np.uint8), camera, depth)
        if progress is not None:
            progress(k + 1, len(job.cameras))


def _cameras(indices: list[int]) -> str:
    """'camera 3' or 'cameras 0, 4, 7' (at most ten listed)."""
    listed = ", ".join(str(k) for k in indices[:10]) + (f" and {len(indices) - 10} more" if len(indices) > 10 else "")
    return f"camera {listed}" if len(indices) == 1 else f"cameras {listed}"
