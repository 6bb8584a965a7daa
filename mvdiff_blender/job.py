"""Turn the scene and its ``scene.mvdiff`` settings into a job for the backend.

Everything that reads Blender data happens here, on the main thread, before any network call:
poses, depth renders, mesh export. The job is written to its own folder before it is sent, so
a failed or cancelled job leaves its inputs on disk (``python -m backend texture job.npz`` runs
it again without Blender).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bpy
import numpy as np

from ..backend.protocol import GenerationSettings, PanoramaJob, TextureJob, check_prompt_count
from ..backend.validation import InputError
from . import apply, cameras, export, render_depth, uv_overlap, world_image
from .properties import AUTO_MODE

UNSAVED_FOLDER_NAME = "MVDiffusion"
"""Results of an unsaved .blend go to this folder in the user's home directory, which outlives the
add-on (the extension's own user folder is deleted when it is uninstalled)."""
EMPTY_VIEW_LIMIT = 0.98
"""A view whose depth is empty (nothing hit) on more than this share of its pixels is reported."""
RECORD_NAME = "blender.json"
"""What the add-on needs to apply a job's result again (*Apply Result*), next to its job.npz."""

Steps = Generator[tuple[str, int, int], None, "PreparedJob"]


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
    make_single_user: bool = False
    make_uv_active: bool = True
    warnings: list[str] = field(default_factory=list)  # shown when the job is sent

    def record(self) -> dict:
        """The JSON-able part that :func:`read_record` turns back into a PreparedJob (without the job bytes)."""
        data = asdict(self)
        data.pop("data")
        data.pop("warnings")
        data.pop("placed_cameras")
        data["folder"], data["output_dir"] = str(self.folder), str(self.output_dir)
        return data

    def write_record(self) -> None:
        (self.folder / RECORD_NAME).write_text(json.dumps(self.record(), indent=1), encoding="utf-8")


def report_warnings(report_path: Path) -> list[str]:
    """What a finished job's ``report.json`` warns about (cameras that saw nothing, low coverage), so the
    user reads it in Blender and not only in a file; cameras are numbered in the job's order from 0."""
    try:
        warnings = json.loads(Path(report_path).read_text("utf-8")).get("warnings", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else []


def read_record(folder: str | Path) -> PreparedJob:
    """The job prepared in ``folder`` (a job folder, or its ``result`` folder), to apply its result again."""
    folder = Path(bpy.path.abspath(str(folder)))
    if folder.name == "result" and not (folder / RECORD_NAME).is_file():
        folder = folder.parent
    path = folder / RECORD_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PreparedJob(kind=str(data["kind"]), data=b"", folder=folder, output_dir=Path(data["output_dir"]),
                           basename=str(data["basename"]), objects=[str(n) for n in data["objects"]],
                           uv_map=data.get("uv_map"), make_single_user=bool(data.get("make_single_user")),
                           make_uv_active=bool(data.get("make_uv_active", True)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JobError(f"{folder} is not a job folder of this add-on ({RECORD_NAME} cannot be read: {err})") from None


def output_dir(settings) -> Path:
    """The chosen folder, or the .blend's folder; an unsaved file uses ``~/MVDiffusion``.

    Not the extension's user folder: uninstalling the extension deletes it, and the scene would
    lose its images.
    """
    if settings.output_dir:
        return Path(bpy.path.abspath(settings.output_dir))
    if bpy.data.filepath:
        return Path(bpy.data.filepath).parent
    return Path.home() / UNSAVED_FOLDER_NAME


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
            try:
                check_prompt_count(len(lines), views)
            except InputError as err:
                raise JobError(f"The text block {per_view.name!r}: {err.problem}") from None
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
    """Poses, depths and meshes of the selected objects as a texture job written to disk, in one call."""
    return run_steps(texture_job_steps(context), on_progress)


def run_steps(steps: Steps, on_progress: Callable[[str, int, int], None] | None = None) -> PreparedJob:
    """Run a preparation to its end; an error (also from ``on_progress``) closes it, which cleans up."""
    try:
        while True:
            try:
                stage, done, total = next(steps)
            except StopIteration as end:
                return end.value
            if on_progress is not None:
                on_progress(stage, done, total)
    finally:
        steps.close()


def check_targets(objects: list[bpy.types.Object], settings) -> None:
    """Everything that would stop the result from being applied, before any camera is placed or depth rendered."""
    try:
        apply.check_targets(objects, unwrap=settings.uv_source == "UNWRAP",
                            make_single_user=settings.make_single_user)
    except apply.ApplyError as err:
        raise JobError(str(err)) from None
    if settings.uv_source == "ACTIVE":
        for obj in objects:
            share = uv_overlap.overlap_fraction(uv_overlap.uv_triangles(obj))
            if share > uv_overlap.UV_OVERLAP_LIMIT:
                layer = obj.data.uv_layers.active
                raise JobError(
                    f"{100 * share:.0f}% of the UV map '{layer.name}' of '{obj.name}' is used by more than one face "
                    f"(overlapping islands: the bake would paint one texel for several surfaces); set UVs to "
                    f"'Unwrap', or unwrap '{obj.name}' without overlaps")


def texture_job_steps(context) -> Steps:
    """The texture job's preparation, one step per depth render: yields ("depth", done, total), returns
    the PreparedJob. Closing it early (cancel) removes the cameras it placed and restores the scene."""
    scene = context.scene
    settings = scene.mvdiff
    objects = textured_objects(context)
    if not objects:
        raise JobError("Select one or more mesh objects to texture")
    check_targets(objects, settings)
    collection_before = set(cameras.placed_camera_names(scene))
    try:
        poses = cameras.poses_for_settings(context, settings, objects, list(context.selected_objects))
    except cameras.CameraError as err:
        raise JobError(str(err)) from None
    placed = sorted(set(cameras.placed_camera_names(scene)) - collection_before)
    try:
        return (yield from _texture_job(context, settings, objects, poses, placed))
    except BaseException:  # also GeneratorExit: a cancelled preparation leaves no cameras behind
        cameras.remove_cameras(scene, placed)
        raise


def _texture_job(context, settings, objects, poses, placed) -> Steps:
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
    depths = np.zeros((len(poses), height, width), np.float32)
    try:
        for done, total in render_depth.depth_steps(scene, poses, width, height, folder / "depth", depths):
            yield "depth", done, total
    except render_depth.DepthRenderError as err:
        raise JobError(str(err)) from None
    warnings = _empty_views(poses, depths) + clipped_views(scene, poses)
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
    prepared = PreparedJob("texture", data, folder, out, basename, [o.name for o in objects], uv_map, placed,
                           make_single_user=settings.make_single_user, make_uv_active=settings.make_uv_active,
                           warnings=warnings)
    prepared.write_record()
    return prepared


def _empty_views(poses, depths: np.ndarray) -> list[str]:
    """Refuse when no camera sees anything; otherwise a warning naming the cameras that see (almost) nothing."""
    empty = (depths <= 0).reshape(len(depths), -1).mean(axis=1)
    if np.all(empty >= 1.0):
        raise JobError("No camera sees any geometry (every depth render is empty): check the cameras' direction "
                       "and clip range")
    names = [p.name or f"view {k}" for k, (p, e) in enumerate(zip(poses, empty, strict=True)) if e > EMPTY_VIEW_LIMIT]
    if not names:
        return []
    return [f"{len(names)} camera(s) see almost nothing (over {100 * EMPTY_VIEW_LIMIT:.0f}% of the view is empty): "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"]


def clipped_views(scene: bpy.types.Scene, poses) -> list[str]:
    """A warning naming the cameras whose Clip End stops short of the scene's far side (geometry there
    is missing from their depth and gets no texture from them); placed cameras never do."""
    corners = cameras.scene_corners(scene)
    if not len(corners):
        return []
    short = []
    for k, pose in enumerate(poses):
        far = float(np.linalg.norm(corners - pose.matrix_world[:3, 3], axis=1).max())
        if pose.clip_end < far:
            short.append((pose.name or f"view {k}", far))
    if not short:
        return []
    reach = max(far for _, far in short)
    return [f"{len(short)} camera(s) end their Clip End before the far side of the scene ({reach:.4g} units "
            f"away), so geometry beyond it gets no texture from them: {', '.join(n for n, _ in short[:8])}"
            f"{' ...' if len(short) > 8 else ''}. Raise their Clip End"]


def world_job_steps(context) -> Steps:
    """A World job has no depth to render: its preparation is one step."""
    return prepare_world_job(context)
    yield  # a generator, like texture_job_steps


def prepare_world_job(context) -> PreparedJob:
    settings = context.scene.mvdiff
    generation = generation_settings(settings, settings.world_prompt, 1)
    try:
        image = world_image.world_image(context, settings)
    except world_image.WorldImageError as err:
        raise JobError(str(err)) from None
    job = PanoramaJob(generation, settings.world_height, settings.world_view_size, image)
    try:
        job.validate()
    except InputError as err:
        raise JobError(f"{err.field}: {err.problem}") from None
    out = output_dir(settings)
    folder, basename = _new_folder(out, "world", settings.world_result_name)
    data = job.to_bytes()
    (folder / "job.npz").write_bytes(data)
    prepared = PreparedJob("panorama", data, folder, out, basename, [])
    prepared.write_record()
    return prepared
