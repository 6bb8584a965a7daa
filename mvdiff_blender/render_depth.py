"""Metric depth for a list of poses, rendered by Cycles and read back from a 32-bit EXR.

Cycles' Depth pass is planar z at pixel centres, unfiltered (reference/blender.md section 6), which
is exactly the backend's depth convention; only the background (1e10) is mapped to 0. The pass
goes through a compositor File Output node, because background Blender has no Viewer image and
no Render Result pixels.

Every scene setting touched is restored afterwards, and the temporary camera, compositor,
images and files are removed, also when a render fails or the progress callback raises (which
is how a caller cancels). A setting is only written when it differs: assigning
``render.engine`` its current value has hung Blender 4.5.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import bpy
import numpy as np

from . import compat
from .cameras import Pose

# Cycles writes 1e10 where a ray hit nothing; anything this far is background.
BACKGROUND_DEPTH = 1e9
_FILE_PREFIX = "depth_"


class DepthRenderError(RuntimeError):
    """Blender could not render the depth of a pose; the message says which and why."""


class SceneState:
    """Changes settings and remembers how to undo them, so that one ``restore`` puts everything back."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def set(self, owner, attribute: str, value) -> None:
        """Set ``owner.attribute`` only if it differs; remember the old value for ``restore``."""
        old = getattr(owner, attribute)
        if _same(old, value):
            return
        setattr(owner, attribute, value)
        self._undo.append(lambda: setattr(owner, attribute, old))

    def defer(self, action: Callable[[], object]) -> None:
        """Run ``action`` on restore (undo steps run in reverse order of registration)."""
        self._undo.append(action)

    def restore(self) -> list[BaseException]:
        """Undo everything; keep going past failures and return them."""
        errors = []
        while self._undo:
            action = self._undo.pop()
            try:
                action()
            except Exception as err:  # one failed step must not leave the rest of the scene changed
                errors.append(err)
        return errors


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _render_view_layer(scene: bpy.types.Scene) -> bpy.types.ViewLayer:
    layer = getattr(bpy.context, "view_layer", None)
    if layer is not None and scene.view_layers.get(layer.name) == layer:
        return layer
    return scene.view_layers[0]


def _configure(scene: bpy.types.Scene, layer: bpy.types.ViewLayer, width: int, height: int,
               state: SceneState) -> None:
    """Cycles on the CPU at one sample, no bounces, no denoising: only the Depth pass matters."""
    render = scene.render
    state.set(render, "engine", "CYCLES")
    cycles = scene.cycles
    for attribute, value in (("device", "CPU"), ("samples", 1), ("use_adaptive_sampling", False),
                             ("use_denoising", False), ("max_bounces", 0), ("use_sample_subset", False),
                             ("time_limit", 0.0)):
        if hasattr(cycles, attribute):
            state.set(cycles, attribute, value)
    for attribute, value in (("resolution_x", width), ("resolution_y", height), ("resolution_percentage", 100),
                             ("pixel_aspect_x", 1.0), ("pixel_aspect_y", 1.0), ("use_border", False),
                             ("use_persistent_data", True), ("use_motion_blur", False), ("use_multiview", False),
                             ("use_freestyle", False), ("use_sequencer", False), ("use_compositing", True)):
        state.set(render, attribute, value)
    # Render only the Depth pass: every other pass of the view layer (and Cycles' own) is switched off.
    state.set(layer, "use", True)
    state.set(layer, "samples", 0)
    for owner in (layer, getattr(layer, "cycles", None)):
        if owner is None:
            continue
        for prop in owner.bl_rna.properties:
            name = prop.identifier
            if prop.type == "BOOLEAN" and not prop.is_readonly and (
                    name.startswith("use_pass_") or name in ("denoising_store_passes", "pass_debug_sample_count")):
                state.set(owner, name, name == "use_pass_z")


def render_depths(scene: bpy.types.Scene, poses: Sequence[Pose], width: int, height: int, work_dir: str | Path,
                  on_progress: Callable[[int, int], object] | None = None) -> np.ndarray:
    """Planar depth float32 (N, H, W) for ``poses`` at ``width`` x ``height``; 0 where nothing was hit.

    ``work_dir`` holds the EXR files while they are read (it is created if missing, and what this
    call wrote there is removed). ``on_progress(done, total)`` runs after each pose; raising from it
    stops the renders and restores the scene.
    """
    depths = np.zeros((len(poses), int(height), int(width)), np.float32) if len(poses) else None
    steps = depth_steps(scene, poses, width, height, work_dir, depths)
    try:
        for done, total in steps:
            if on_progress is not None:
                on_progress(done, total)
    finally:
        steps.close()
    return depths


def depth_steps(scene: bpy.types.Scene, poses: Sequence[Pose], width: int, height: int, work_dir: str | Path,
                out: np.ndarray | None) -> Iterator[tuple[int, int]]:
    """Render one pose per step into ``out[k]`` (float32 (N, H, W)), yielding (done, total) after each.

    The UI advances it from a timer, one pose per tick, so Blender redraws in between and Esc can
    stop it; closing the generator early (``close()``) stops the renders and restores the scene,
    exactly like an error does. :func:`render_depths` runs it to the end in one call.
    """
    poses = list(poses)
    if not poses:
        raise DepthRenderError("No camera poses to render depth for")
    if int(width) <= 0 or int(height) <= 0:
        raise DepthRenderError(f"The depth size must be positive, got {width} x {height}")
    width, height = int(width), int(height)
    if out is None or out.shape != (len(poses), height, width):
        raise DepthRenderError(f"The depth buffer must be ({len(poses)}, {height}, {width})")
    if not hasattr(scene, "cycles"):
        raise DepthRenderError("Depth is rendered with Cycles, which is not available: enable the Cycles add-on")
    work_dir = Path(work_dir)
    created_work_dir = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="mvdiff-depth-", dir=work_dir))
    render_results = {image.name for image in bpy.data.images if image.type == "RENDER_RESULT"}
    layer = _render_view_layer(scene)
    state = SceneState()
    failed = True
    try:
        state.defer(lambda: _remove_new_render_results(render_results))
        _configure(scene, layer, width, height, state)
        camera = _temporary_camera(scene, state)
        compat.setup_depth_compositor(scene, layer, str(folder), _FILE_PREFIX, state)
        for index, pose in enumerate(poses):
            pose.apply_to(camera)
            out[index] = _render_one(scene, layer, folder, width, height, pose, index)
            if index + 1 < len(poses):
                yield index + 1, len(poses)
        failed = False
    finally:
        errors = state.restore()
        shutil.rmtree(folder, ignore_errors=True)
        if created_work_dir:
            try:
                work_dir.rmdir()
            except OSError:
                pass  # the caller put other files there meanwhile
        if errors and not failed:
            raise DepthRenderError(f"Could not restore the scene after rendering depth: {errors[0]}") from errors[0]
    yield len(poses), len(poses)  # after the restore: the last step leaves the scene as it was


def _temporary_camera(scene: bpy.types.Scene, state: SceneState) -> bpy.types.Object:
    """One camera object, reused for every pose; removed (after scene.camera is restored) on restore."""
    data = bpy.data.cameras.new("MVDiffusion Depth Camera")
    camera = bpy.data.objects.new("MVDiffusion Depth Camera", data)

    def remove() -> None:
        bpy.data.objects.remove(camera)
        bpy.data.cameras.remove(data)

    state.defer(remove)
    scene.collection.objects.link(camera)
    state.set(scene, "camera", camera)
    return camera


def _render_one(scene: bpy.types.Scene, layer: bpy.types.ViewLayer, folder: Path, width: int, height: int,
                pose: Pose, index: int) -> np.ndarray:
    label = f"pose {index}" + (f" ({pose.name})" if pose.name else "")
    try:
        result = bpy.ops.render.render(scene=scene.name, layer=layer.name)
    except RuntimeError as err:
        raise DepthRenderError(f"Cycles could not render the depth of {label}: {err}") from err
    if "FINISHED" not in result:
        raise DepthRenderError(f"Cycles could not render the depth of {label} (the render was {result})")
    files = sorted(folder.glob(f"{_FILE_PREFIX}*.exr"))
    if len(files) != 1:
        raise DepthRenderError(f"The depth render of {label} wrote {len(files)} EXR files to {folder}, expected 1")
    try:
        return read_depth_exr(files[0], width, height)
    finally:
        files[0].unlink()


def read_depth_exr(path: str | Path, width: int, height: int) -> np.ndarray:
    """A single-layer depth EXR as float32 (H, W), row 0 at the top, 0 where nothing was hit."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        image.colorspace_settings.is_data = True
        if tuple(image.size) != (width, height):
            raise DepthRenderError(f"The depth image {path} is {tuple(image.size)}, expected {(width, height)}")
        channels = image.channels
        pixels = np.empty(width * height * channels, np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    depth = pixels.reshape(height, width, channels)[::-1, :, 0]  # Blender's rows run bottom-up
    return np.where(np.isfinite(depth) & (depth < BACKGROUND_DEPTH), depth, 0.0).astype(np.float32)


def _remove_new_render_results(before: set[str]) -> None:
    """The render creates a "Render Result" image; drop it unless the user had one already."""
    for image in list(bpy.data.images):
        if image.type == "RENDER_RESULT" and image.name not in before:
            bpy.data.images.remove(image)
