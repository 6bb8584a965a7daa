"""Everything the user sets for a job, in one group per ID type: ``scene.mvdiff`` and, for state
that lives only while Blender runs (the job in flight, its progress), ``window_manager.mvdiff``.

Saved with the .blend: prompts, camera source, sampling and output settings. Not saved: which
job is running, so reopening a file never shows a stale progress bar.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from ..backend.protocol import VIEW_MULTIPLE
from ..backend.sampling_options import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    MODE_NOTES,
    MODES,
    SCHEDULERS,
    scheduler_description,
)

WORLD_SOURCES = [
    ("TEXT", "Text", "The prompt alone"),
    ("IMAGE", "Image", "Around a photo, which stays the World's front view (facing +X)"),
    ("RENDER", "Current Render", "Around a render of the scene's camera, which stays the front view (facing +X)"),
]
CAMERA_SOURCES = [
    ("SELECTED", "Selected Cameras", "The camera objects in the selection, in name order"),
    ("ANIMATED", "Animated Camera", "One camera's pose on every step-th frame of a frame range"),
    ("ORBIT", "Orbit", "Cameras placed by the add-on in rings around the selected meshes"),
    ("WALK", "Walk Along Curve", "Cameras placed by the add-on along a curve, e.g. through a room"),
]
UV_SOURCES = [
    ("ACTIVE", "Active UV Map", "Bake into each object's active UV map (one textured object only)"),
    ("UNWRAP", "Unwrap", "Let the backend unwrap; the result goes into a new UV map named MVDiffusion"),
]
TEXTURE_SIZES = [(str(s), f"{s} px", f"{s} x {s} texels") for s in (256, 512, 1024, 2048, 4096)]
# The backend's scheduler names are the identifiers, so the job sends the choice as it is.
SCHEDULER_ITEMS = [(name, choice.label, scheduler_description(name)) for name, choice in SCHEDULERS.items()]
# The backend's mode names are the identifiers too; AUTO leaves the choice to the backend.
AUTO_MODE = "AUTO"
MODE_LABELS = {"trained": "Trained Multi-View", "training_free": "Training-Free", "independent": "Independent Views"}
MODE_ITEMS = [(AUTO_MODE, "Best Available", "The trained multi-view weights where the backend has them loaded, "
               "else training-free consistency from the base model alone")] + [
    (name, MODE_LABELS[name], MODE_NOTES[name][0].upper() + MODE_NOTES[name][1:]) for name in MODES]


def snap_view_size(value: int) -> int:
    """The nearest multiple of the view-size rule (at least one multiple): what a typed 200 becomes."""
    return max(VIEW_MULTIPLE, VIEW_MULTIPLE * round(int(value) / VIEW_MULTIPLE))


def _snapper(name: str):
    def update(self, _context) -> None:
        value = getattr(self, name)
        snapped = snap_view_size(value)
        if snapped != value:  # the assignment calls this again, with a value that stays
            setattr(self, name, snapped)
    return update


def _is_camera(_self, obj: bpy.types.Object) -> bool:
    return obj.type == "CAMERA"


def _is_curve(_self, obj: bpy.types.Object) -> bool:
    return obj.type == "CURVE"


class MVDIFF_PG_scene(bpy.types.PropertyGroup):
    # --- what to generate
    prompt: StringProperty(name="Prompt", description="What the textures should show")
    prompts_text: PointerProperty(
        name="Per-View Prompts", type=bpy.types.Text,
        description="Optional text block with one prompt per line, one line per view (overrides Prompt)",
    )
    negative_prompt: StringProperty(name="Negative Prompt", description="What the textures should not show",
                                    default="blurry, low quality")
    scheduler: EnumProperty(
        name="Scheduler", items=SCHEDULER_ITEMS, default=DEFAULT_SCHEDULER,
        description="How the views are denoised. DDIM is what MVDiffusion was released with; the multistep "
                    "solvers need fewer steps: set Steps to the count each option names",
    )
    consistency_mode: EnumProperty(
        name="Consistency", items=MODE_ITEMS, default=AUTO_MODE,
        description="How the views are made to agree where they overlap",
    )
    steps: IntProperty(name="Steps", description="Denoising steps per view", default=DEFAULT_STEPS, min=1, max=1000,
                       soft_max=100)
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale", default=DEFAULT_GUIDANCE,
                            min=0.0, max=100.0, soft_max=20.0)
    seed: IntProperty(name="Seed", description="Random seed; the same seed and inputs give the same result",
                      default=0, min=0)

    # --- cameras
    camera_source: EnumProperty(name="Cameras", items=CAMERA_SOURCES, default="SELECTED",
                                description="Where the job's camera poses come from")
    animated_camera: PointerProperty(name="Camera", type=bpy.types.Object, poll=_is_camera,
                                     description="The animated camera (the scene camera when empty)")
    frame_start: IntProperty(name="Start", description="First frame of the range", default=1, min=0)
    frame_end: IntProperty(name="End", description="Last frame of the range", default=48, min=0)
    frame_step: IntProperty(name="Step", description="Use every step-th frame", default=4, min=1)
    orbit_views: IntProperty(name="Views per Ring", default=8, min=1, max=64,
                             description="Cameras evenly spaced around each ring")
    orbit_rings: IntProperty(name="Rings", default=2, min=1, max=8,
                             description="Rings of cameras at elevations from 0 up to the highest")
    orbit_elevation: FloatProperty(name="Highest Elevation", default=0.6109, min=-1.5, max=1.5, subtype="ANGLE",
                                   description="Elevation of the highest ring above the selection's centre")
    orbit_distance: FloatProperty(name="Distance", default=2.0, min=0.5, max=20.0,
                                  description="Camera distance in radii of the selection's bounding sphere")
    walk_curve: PointerProperty(name="Curve", type=bpy.types.Object, poll=_is_curve,
                                description="The cameras walk along this curve, looking ahead")
    walk_views: IntProperty(name="Views", default=12, min=2, max=512, description="Cameras along the curve")
    width: IntProperty(name="Width", description=f"View width in pixels (snaps to a multiple of {VIEW_MULTIPLE})",
                       default=512, min=64, max=2048, step=VIEW_MULTIPLE, update=_snapper("width"))
    height: IntProperty(name="Height",
                        description=f"View height in pixels (snaps to a multiple of {VIEW_MULTIPLE})",
                        default=384, min=64, max=2048, step=VIEW_MULTIPLE, update=_snapper("height"))
    lens: FloatProperty(name="Focal Length", default=24.0, min=1.0, max=500.0, subtype="DISTANCE_CAMERA",
                        description="Focal length of the cameras the add-on places")

    # --- texture
    uv_source: EnumProperty(name="UVs", items=UV_SOURCES, default="UNWRAP",
                            description="Which UVs the texture is baked into")
    make_uv_active: BoolProperty(
        name="Make UV Map Active", default=True,
        description="On apply, make the texture's UV map the active and active-render map of each object, so "
                    "exports and bakes that use the active map see the texture's UVs")
    make_single_user: BoolProperty(
        name="Make Single User", default=False,
        description="Give each textured object its own copy of a mesh that other objects share (linked "
                    "duplicates) when the texture is applied; without it such objects are refused, because the "
                    "new UV map and material would reach every object that uses the mesh")
    texture_size: EnumProperty(name="Texture Size", items=TEXTURE_SIZES, default="1024",
                               description="Width and height of the baked texture")
    texture_16bit: BoolProperty(name="16-bit Texture", default=False,
                                description="Write 16 bits per channel (smoother gradients, twice the size)")
    output_dir: StringProperty(name="Output Folder", subtype="DIR_PATH", default="",
                               description="Where results are saved; empty: next to the .blend file, or in "
                                           "MVDiffusion in your home folder while the file is unsaved")
    result_name: StringProperty(name="Name", default="",
                                description="File name of the results, without extension; empty: the .blend's "
                                            "name, the kind of job and the time. Existing files are never replaced")

    # --- environment
    world_prompt: StringProperty(name="Prompt", description="What the 360 environment should show")
    world_source: EnumProperty(name="From", items=WORLD_SOURCES, default="TEXT",
                               description="Make the World from the prompt alone or around an image")
    world_image: PointerProperty(name="Image", type=bpy.types.Image,
                                 description="The photo the World is made around; it stays the front view")
    world_height: IntProperty(name="Height", description="Height of the equirectangular image (width is twice)",
                              default=1024, min=64, max=8192)
    world_view_size: IntProperty(
        name="View Size", description=f"Size of each generated view (snaps to a multiple of {VIEW_MULTIPLE})",
        default=512, min=64, max=2048, step=VIEW_MULTIPLE, update=_snapper("world_view_size"))
    world_strength: FloatProperty(name="Strength", default=1.0, min=0.0, soft_max=10.0,
                                  description="Background strength of the new World")
    world_result_name: StringProperty(name="Name", default="",
                                      description="File name of the panorama, without extension; empty: the "
                                                  ".blend's name and the time. Existing files are never replaced")
    world_replace_current: BoolProperty(name="Use Current World", default=False,
                                        description="Put the panorama into the scene's World instead of a new one")


class MVDIFF_PG_runtime(bpy.types.PropertyGroup):
    """The job in flight; kept on the window manager so it is never saved into a .blend."""

    running: BoolProperty(default=False, description="A job is being prepared or runs on the backend")
    kind: StringProperty(default="", description="The running job's kind: texture or world")
    job_id: StringProperty(default="", description="The backend's id of the running job")
    stage: StringProperty(default="", description="The stage the running job is in")
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR",
                            description="How far the running job's stage has come")
    message: StringProperty(default="", description="What the last or running job reported")
    preview_image: StringProperty(default="", description="The image that shows the running job's latest preview")
    result_path: StringProperty(default="", subtype="FILE_PATH",
                                description="The texture or panorama file the last job saved")
    job_folder: StringProperty(default="", subtype="DIR_PATH",
                               description="The last job's folder (its inputs, and its result once downloaded)")


classes = (MVDIFF_PG_scene, MVDIFF_PG_runtime)


def register_pointers() -> None:
    bpy.types.Scene.mvdiff = PointerProperty(type=MVDIFF_PG_scene)
    bpy.types.WindowManager.mvdiff = PointerProperty(type=MVDIFF_PG_runtime)


def unregister_pointers() -> None:
    del bpy.types.WindowManager.mvdiff
    del bpy.types.Scene.mvdiff
