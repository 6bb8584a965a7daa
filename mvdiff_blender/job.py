"""Turn the scene and its ``scene.mvdiff`` settings into a job for the backend.

Everything that reads Blender data happens here, on the main thread, before any network call:
poses, depth renders, mesh export. The job is written to its own folder before it is sent, so
a failed or cancelled job leaves its inputs on disk (``python -m backend texture job.npz`` runs
it again without Blender).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bpy

from ..backend.protocol import GenerationSettings, PanoramaJob, TextureJob
from ..backend.validation import InputError
from . import cameras, export, render_depth
from .properties import AUTO_MODE


class JobError(ValueError):
    """The scene or the settings cannot make a job; the message says what to change."""


@dataclass
class PreparedJob:
    kind: str
    data: bytes
    folder: Path  # the job's own folder: job.npz, then the preview and the downloaded results
    output_dir: Path  # where the results that the scene uses are saved
    basename: str
    objects: list[str]  # names of the textured objects (texture jobs)
    uv_map: str | None = None
    placed_cameras: list[str] | None = None  # cameras this job placed (removed again if it fails)


def output_dir(settings) -> Path:
    """The chosen folder, or the .blend's folder; an unsaved file uses the extension's user folder."""
    if settings.output_dir:
        return Path(bpy.path.abspath(settings.output_dir))
    if bpy.data.filepath:
        return Path(bpy.data.filepath).parent
    from .preferences import user_folder

    return user_folder("results")


def _new_folder(out: Path, kind: str, name: str = "") -> tuple[Path, str]:
    """The job's own folder under ``out/mvdiff_jobs`` and the base name of its result files."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    blend = Path(bpy.data.filepath).stem if bpy.data.filepath else "untitled"
    basename = re.sub(r"[^\w.-]+", "_", name.strip()) or re.sub(r"[^\w.-]+", "_", f"{blend}_{kind}_{stamp}")
    folder = out / "mvdiff_jobs" / basename
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = out / "mvdiff_jobs" / f"{basename}_{suffix}"
    folder.mkdir(parents=True)
    return folder, basename


def generation_settings(settings, prompt: str, views: int, per_view=None) -> GenerationSettings:
    """Prompts from the text block ``per_view`` (one line per view) or the single ``prompt``."""
    prompts = [prompt]
    if per_view is not None:
        lines = [line.body.strip() for line in per_view.lines if line.body.strip()]
        if lines:
            if len(lines) not in (1, views):
                raise JobError(f"The text block {per_view.name!r} has {len(lines)} prompts; "
                               f"give one, or one per view ({views})")
            prompts = lines
    if not any(p.strip() for p in prompts):
        raise JobError("Write a prompt first")
    try:
        mode = None if settings.consistency_mode == AUTO_MODE else settings.consistency_mode
        return GenerationSettings(prompts, settings.negative_prompt, settings.steps, settings.guidance,
                                  settings.seed, settings.scheduler, mode).validate()
    except InputError as err:
        raise JobError(f"{err.field}: {err.problem}") from None


def textured_objects(context) -> list[bpy.types.Object]:
    return sorted((o for o in context.selected_objects if o.type == "MESH"), key=lambda o: o.name)


def prepare_texture_job(context, on_progress: Callable[[str, int, int], None] | None = None) -> PreparedJob:
    """Poses, depths and meshes of the selected objects as a texture job written to disk."""
    scene = context.scene
    settings = scene.mvdiff
    objects = textured_objects(context)
    if not objects:
        raise JobError("Select one or more mesh objects to texture")
    collection_before = set(cameras.placed_camera_names(scene))
    try:
        poses = cameras.poses_for_settings(context, settings, objects, list(context.selected_objects))
    except cameras.CameraError as err:
        raise JobError(str(err)) from None
    placed = sorted(set(cameras.placed_camera_names(scene)) - collection_before)
    try:
        return _texture_job(context, settings, objects, poses, placed, on_progress)
    except Exception:
        cameras.remove_cameras(scene, placed)
        raise


def _texture_job(context, settings, objects, poses, placed, on_progress) -> PreparedJob:
    scene = context.scene
    if not poses:
        raise JobError("The camera source gave no cameras")
    width, height = settings.width, settings.height
    generation = generation_settings(settings, settings.prompt, len(poses), settings.prompts_text)
    out = output_dir(settings)
    folder, basename = _new_folder(out, "texture", settings.result_name)
    depsgraph = context.evaluated_depsgraph_get()
    try:
        exported = export.export_meshes(depsgraph, objects, settings.uv_source,
                                        export.scene_occluders(scene, depsgraph, objects))
    except export.ExportError as err:
        raise JobError(str(err)) from None
    depths = render_depth.render_depths(scene, poses, width, height, folder / "depth",
                                        on_progress=(lambda i, n: on_progress("depth", i, n)) if on_progress else None)
    job = TextureJob(generation, [p.to_camera(width, height) for p in poses], list(depths), exported.mesh,
                     int(settings.texture_size), exported.object_names, 16 if settings.texture_16bit else 8,
                     exported.occluders)
    try:
        job.validate()
    except InputError as err:
        raise JobError(f"{err.field}: {err.problem}") from None
    data = job.to_bytes()
    (folder / "job.npz").write_bytes(data)
    uv_map = exported.uv_maps[0] if exported.uv_maps else None
    return PreparedJob("texture", data, folder, out, basename, [o.name for o in objects], uv_map, placed)


def prepare_world_job(context) -> PreparedJob:
    settings = context.scene.mvdiff
    generation = generation_settings(settings, settings.world_prompt, 1)
    if settings.world_view_size % 64:
        raise JobError(f"View Size must be a multiple of 64, got {settings.world_view_size}")
    job = PanoramaJob(generation, settings.world_height, settings.world_view_size)
    out = output_dir(settings)
    folder, basename = _new_folder(out, "world", settings.world_result_name)
    data = job.to_bytes()
    (folder / "job.npz").write_bytes(data)
    return PreparedJob("panorama", data, folder, out, basename, [])
