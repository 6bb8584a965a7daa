"""Camera sources -> a list of poses: selected cameras, an animated camera, or cameras the add-on places.

A :class:`Pose` is a plain snapshot of a Blender perspective camera (``matrix_world`` and lens
data), so that depth rendering and the job never depend on the scene changing in between. It
converts to the backend's :class:`Camera` (OpenCV axes, pixel ``K``) through
``Camera.from_blender``, the one place where that conversion is written.

Placed cameras (orbit, walk) live in their own collection, ``MVDiffusion Cameras``, so the user
can look at them and edit them; a job reuses them as they are, and placing again replaces only
the cameras in that collection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import bpy
import numpy as np
from mathutils import Matrix

from ..backend.geometry.cameras import BLENDER_TO_OPENCV_AXES, Camera, look_at
from ..backend.protocol import VIEW_MULTIPLE
from .export import GEOMETRY_TYPES

COLLECTION_NAME = "MVDiffusion Cameras"
# Custom properties on the collection: marks it as ours even when Blender renamed it (".001"),
# and records how its cameras were placed so that changed settings place them anew.
_COLLECTION_TAG = "mvdiff_cameras"
_PLACEMENT_KEY = "mvdiff_placement"
PLACED_SENSOR_WIDTH = 36.0
CLIP_MARGIN = 1.1  # placed cameras' clip end: this times the farthest scene point from any of them


class CameraError(ValueError):
    """The camera source cannot give poses; the message names the object or setting to change."""


@dataclass(frozen=True, eq=False)
class Pose:
    """One perspective camera, frozen: ``matrix_world`` is Blender's camera-to-world (looks down -Z)."""

    matrix_world: np.ndarray
    lens: float
    sensor_width: float
    sensor_height: float
    sensor_fit: str
    shift_x: float
    shift_y: float
    clip_start: float
    clip_end: float
    name: str = field(default="")

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix_world, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise CameraError(f"Camera {self.name or '(pose)'}: matrix_world must be a finite 4x4 matrix")
        matrix.flags.writeable = False
        object.__setattr__(self, "matrix_world", matrix)
        for name in ("lens", "sensor_width", "sensor_height", "shift_x", "shift_y", "clip_start", "clip_end"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_camera(self, width: int, height: int) -> Camera:
        """The backend camera seen at ``width`` x ``height`` pixels (square pixels, as rendered)."""
        return Camera.from_blender(
            matrix_world=self.matrix_world, lens=self.lens, sensor_width=self.sensor_width,
            sensor_height=self.sensor_height, sensor_fit=self.sensor_fit, shift_x=self.shift_x,
            shift_y=self.shift_y, width=width, height=height,
        )

    def apply_to(self, camera_object: bpy.types.Object) -> None:
        """Give a camera object this pose (used by depth rendering and to restore edited cameras)."""
        data = camera_object.data
        data.type = "PERSP"
        data.lens_unit = "MILLIMETERS"
        data.lens = self.lens
        data.sensor_width = self.sensor_width
        data.sensor_height = self.sensor_height
        data.sensor_fit = self.sensor_fit
        data.shift_x = self.shift_x
        data.shift_y = self.shift_y
        data.clip_start = self.clip_start
        data.clip_end = self.clip_end
        camera_object.matrix_world = Matrix(self.matrix_world.tolist())


def job_resolution(settings) -> tuple[int, int]:
    """The size every pose is rendered and generated at; the diffusion model needs multiples of VIEW_MULTIPLE."""
    size = []
    for name in ("width", "height"):
        value = int(getattr(settings, name))
        if value <= 0 or value % VIEW_MULTIPLE:
            raise CameraError(f"The view {name} must be a positive multiple of {VIEW_MULTIPLE} pixels, "
                              f"got {value} (setting '{name}')")
        size.append(value)
    return size[0], size[1]


# ---------------------------------------------------------------------- poses of existing cameras
def pose_of(camera_object: bpy.types.Object) -> Pose:
    """The current pose of a perspective camera object (its animated state at the current frame)."""
    if camera_object is None or camera_object.type != "CAMERA":
        name = getattr(camera_object, "name", None)
        raise CameraError(f"{name!r} is not a camera object" if name else "No camera object given")
    data = camera_object.data
    if data.type != "PERSP":
        raise CameraError(f"Camera {camera_object.name!r} is {data.type.lower()}: only perspective cameras "
                          "can be used (set its Type to Perspective)")
    matrix = np.array(camera_object.matrix_world, dtype=np.float64)
    scale = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(scale < 1e-9) or np.linalg.det(matrix[:3, :3]) <= 0:
        raise CameraError(f"Camera {camera_object.name!r} has a zero or negative scale: fix its transform")
    return Pose(matrix, data.lens, data.sensor_width, data.sensor_height, data.sensor_fit, data.shift_x,
                data.shift_y, data.clip_start, data.clip_end, camera_object.name)


def poses_from_selected(objects: Iterable[bpy.types.Object]) -> list[Pose]:
    """The camera objects among ``objects``, in name order (so a job is reproducible)."""
    cams = sorted((o for o in objects if o is not None and o.type == "CAMERA"), key=lambda o: o.name)
    if not cams:
        raise CameraError("Select one or more cameras (the Selected Cameras source uses the cameras "
                          "in the selection)")
    return [pose_of(c) for c in cams]


def poses_from_animation(scene: bpy.types.Scene, camera_object: bpy.types.Object | None, start: int, end: int,
                         step: int) -> list[Pose]:
    """The camera's pose on frames ``start..end`` (inclusive) every ``step``; the current frame is kept."""
    camera_object = camera_object if camera_object is not None else scene.camera
    if camera_object is None:
        raise CameraError("No animated camera: choose one in the Camera setting or set the scene camera")
    if camera_object.type != "CAMERA":
        raise CameraError(f"{camera_object.name!r} is not a camera object (setting 'animated_camera')")
    if end < start:
        raise CameraError(f"The frame range is empty: End ({end}) is before Start ({start})")
    if step < 1:
        raise CameraError(f"The frame Step must be at least 1, got {step}")
    frame, subframe = scene.frame_current, scene.frame_subframe
    poses = []
    try:
        for number in range(start, end + 1, step):
            scene.frame_set(number)
            pose = pose_of(camera_object)
            poses.append(Pose(pose.matrix_world, pose.lens, pose.sensor_width, pose.sensor_height,
                              pose.sensor_fit, pose.shift_x, pose.shift_y, pose.clip_start, pose.clip_end,
                              f"{camera_object.name}@{number}"))
    finally:
        scene.frame_set(frame, subframe=subframe)
    return poses


# ---------------------------------------------------------------------- the collection of placed cameras
def camera_collection(scene: bpy.types.Scene, create: bool = False) -> bpy.types.Collection | None:
    """The scene's ``MVDiffusion Cameras`` collection (a direct child of the scene collection)."""
    for coll in scene.collection.children:
        if coll.name == COLLECTION_NAME or coll.get(_COLLECTION_TAG):
            return coll
    if not create:
        return None
    coll = bpy.data.collections.new(COLLECTION_NAME)
    coll[_COLLECTION_TAG] = True
    scene.collection.children.link(coll)
    return coll


def placed_cameras(scene: bpy.types.Scene) -> list[bpy.types.Object]:
    """The camera objects in the collection, in name order (the order of the job's views)."""
    coll = camera_collection(scene)
    if coll is None:
        return []
    return sorted((o for o in coll.objects if o.type == "CAMERA"), key=lambda o: o.name)


def placed_camera_names(scene: bpy.types.Scene) -> list[str]:
    return [o.name for o in placed_cameras(scene)]


def remove_cameras(scene: bpy.types.Scene, names: Iterable[str] | None = None, drop_empty: bool = True) -> None:
    """Remove cameras from the collection (all when ``names`` is None); nothing outside it is deleted.

    A camera the user also linked to another collection is only unlinked from ours. The collection
    itself goes too once nothing is left in it (a failed job leaves the scene as it found it).
    """
    coll = camera_collection(scene)
    if coll is None:
        return
    wanted = None if names is None else set(names)
    for obj in list(coll.objects):
        if obj.type != "CAMERA" or (wanted is not None and obj.name not in wanted):
            continue
        if len(obj.users_collection) > 1:
            coll.objects.unlink(obj)
            continue
        data = obj.data
        bpy.data.objects.remove(obj)
        if data is not None and data.users == 0:
            bpy.data.cameras.remove(data)
    if wanted is None and _PLACEMENT_KEY in coll:
        del coll[_PLACEMENT_KEY]
    if drop_empty and not coll.objects and not coll.children:
        bpy.data.collections.remove(coll)


def _new_camera(coll: bpy.types.Collection, name: str, matrix_world: np.ndarray, lens: float,
                clip_start: float, clip_end: float) -> bpy.types.Object:
    data = bpy.data.cameras.new(name)
    data.lens = lens
    data.sensor_width = PLACED_SENSOR_WIDTH
    data.sensor_fit = "AUTO"
    data.clip_start = clip_start
    data.clip_end = clip_end
    obj = bpy.data.objects.new(name, data)
    coll.objects.link(obj)
    obj.matrix_world = Matrix(np.asarray(matrix_world, dtype=np.float64).tolist())
    return obj


def _replace_placed(scene: bpy.types.Scene, placement: dict) -> bpy.types.Collection:
    remove_cameras(scene, drop_empty=False)  # keep the collection and the user's settings on it
    coll = camera_collection(scene, create=True)
    coll[_PLACEMENT_KEY] = json.dumps(placement, sort_keys=True)
    return coll


def bounding_sphere(targets: Sequence[bpy.types.Object],
                    depsgraph: bpy.types.Depsgraph | None = None) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere around the targets' evaluated world-space bounding boxes."""
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    corners = []
    for obj in targets:
        evaluated = obj.evaluated_get(depsgraph)
        local = np.array([tuple(c) for c in evaluated.bound_box], dtype=np.float64)
        matrix = np.array(evaluated.matrix_world, dtype=np.float64)
        corners.append(local @ matrix[:3, :3].T + matrix[:3, 3])
    if not corners:
        raise CameraError("Select the mesh objects to orbit around")
    points = np.concatenate(corners)
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    radius = float(np.linalg.norm(points - centre, axis=1).max())
    if not radius > 1e-9:
        raise CameraError("The selected objects have no extent to orbit around (their bounding boxes are empty)")
    return centre, radius


def ring_elevations(rings: int, highest_elevation: float) -> list[float]:
    """Elevations of the rings: spread evenly from 0 up to the highest; one ring sits at the highest."""
    if rings < 1:
        raise CameraError(f"Rings must be at least 1, got {rings}")
    if rings == 1:
        return [float(highest_elevation)]
    return [float(e) for e in np.linspace(0.0, highest_elevation, rings)]


def place_orbit(scene: bpy.types.Scene, targets: Sequence[bpy.types.Object], views_per_ring: int, rings: int,
                highest_elevation: float, distance_radii: float, lens: float) -> list[bpy.types.Object]:
    """Cameras in rings around the targets, all looking at the centre of their bounding sphere.

    Odd rings are turned by half a step so that the rings see the targets from different sides.
    """
    targets = list(targets)
    if views_per_ring < 1:
        raise CameraError(f"Views per Ring must be at least 1, got {views_per_ring}")
    if not distance_radii > 0:
        raise CameraError(f"The orbit Distance must be > 0, got {distance_radii}")
    if abs(highest_elevation) >= math.pi / 2 - 1e-3:
        raise CameraError("The Highest Elevation must lie strictly between -90 and 90 degrees")
    _check_lens(lens)
    elevations = ring_elevations(rings, highest_elevation)
    centre, radius = bounding_sphere(targets)
    distance = distance_radii * radius
    eyes = []
    for ring, elevation in enumerate(elevations):
        for view in range(views_per_ring):
            azimuth = 2.0 * math.pi * (view + 0.5 * (ring % 2)) / views_per_ring
            direction = np.array([math.cos(elevation) * math.cos(azimuth),
                                  math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
            eyes.append((f"MVDiffusion Orbit {ring:02d}-{view:03d}", centre + distance * direction))
    clip_start, clip_end = clip_range(scene, np.array([eye for _, eye in eyes]))
    coll = _replace_placed(scene, _orbit_placement(targets, views_per_ring, rings, highest_elevation,
                                                   distance_radii, lens))
    return [_new_camera(coll, name, look_at(eye, centre) @ BLENDER_TO_OPENCV_AXES, lens, clip_start, clip_end)
            for name, eye in eyes]


def scene_corners(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph | None = None) -> np.ndarray:
    """World-space bounding-box corners (N, 3) of every object a render shows that has geometry."""
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    corners = []
    for obj in scene.objects:
        if obj.type not in GEOMETRY_TYPES or obj.hide_render:
            continue
        evaluated = obj.evaluated_get(depsgraph)
        local = np.array([tuple(c) for c in evaluated.bound_box], dtype=np.float64)
        matrix = np.array(evaluated.matrix_world, dtype=np.float64)
        corners.append(local @ matrix[:3, :3].T + matrix[:3, 3])
    return np.concatenate(corners) if corners else np.zeros((0, 3))


def clip_range(scene: bpy.types.Scene, eyes: np.ndarray) -> tuple[float, float]:
    """Clip start and end for cameras at ``eyes`` (N, 3) that keep all of the scene's geometry in range.

    The end reaches past the farthest bounding-box corner from any camera, whatever the scene's
    units (a room modelled in centimetres is hundreds of units across); the start is a small
    share of the scene's size, so small scenes are not cut either.
    """
    corners = scene_corners(scene)
    if not len(corners):
        return 0.01, 1000.0
    far = float(np.linalg.norm(corners[None, :, :] - eyes[:, None, :], axis=2).max())
    size = float(np.linalg.norm(corners.max(axis=0) - corners.min(axis=0)))
    clip_end = CLIP_MARGIN * max(far, size, 1e-3)
    clip_start = min(0.01, max(1e-6, 1e-4 * size))
    return clip_start, clip_end


def curve_polyline(curve_object: bpy.types.Object, depsgraph: bpy.types.Depsgraph | None = None
                   ) -> tuple[np.ndarray, bool]:
    """World-space points along the evaluated curve's first spline, in order, and whether it is closed."""
    if curve_object is None or curve_object.type != "CURVE":
        name = getattr(curve_object, "name", None)
        raise CameraError(f"{name!r} is not a curve object (setting 'walk_curve')" if name else
                          "Choose the curve to walk along (setting 'walk_curve')")
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    evaluated = curve_object.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        if mesh is None or len(mesh.vertices) < 2:
            raise CameraError(f"The curve {curve_object.name!r} has fewer than two points")
        if len(mesh.polygons):
            raise CameraError(f"The curve {curve_object.name!r} has a bevel or extrusion: walk cameras need a "
                              "plain curve (set Geometry > Extrude and Bevel Depth to 0)")
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        edges = np.empty(len(mesh.edges) * 2, np.int32)
        mesh.edges.foreach_get("vertices", edges)
        matrix = np.array(evaluated.matrix_world, dtype=np.float64)
    finally:
        evaluated.to_mesh_clear()
    points = co.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    order, closed = _chain(len(points), edges.reshape(-1, 2))
    return points[order], closed


def _chain(count: int, edges: np.ndarray) -> tuple[list[int], bool]:
    """Vertex order along the connected chain that holds vertex 0 (the first spline)."""
    neighbours: list[list[int]] = [[] for _ in range(count)]
    for a, b in edges.tolist():
        if a != b:
            neighbours[a].append(b)
            neighbours[b].append(a)
    # Walk the component of vertex 0 from one of its ends (any vertex of degree 1), else it is a loop.
    component, stack = {0}, [0]
    while stack:
        for n in neighbours[stack.pop()]:
            if n not in component:
                component.add(n)
                stack.append(n)
    if len(component) < 2:
        raise CameraError("The walk curve's first spline has no segments")
    if any(len(neighbours[v]) > 2 for v in component):
        raise CameraError("The walk curve branches: use a curve whose first spline is a simple path")
    ends = sorted(v for v in component if len(neighbours[v]) == 1)
    closed = not ends
    start = 0 if closed else ends[0]
    order, previous, current = [start], -1, start
    while True:
        nxt = [n for n in neighbours[current] if n != previous]
        if not nxt or nxt[0] == start:
            break
        previous, current = current, nxt[0]
        order.append(current)
    return order, closed


def _along(points: np.ndarray, lengths: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Points at arc lengths ``s`` on a polyline with cumulative ``lengths``."""
    return np.stack([np.interp(s, lengths, points[:, axis]) for axis in range(3)], axis=-1)


def walk_frames(points: np.ndarray, closed: bool, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions evenly spaced by arc length and unit tangents there, (views, 3) each."""
    if closed:
        points = np.concatenate([points, points[:1]])
    lengths = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    total = float(lengths[-1])
    if not total > 1e-9:
        raise CameraError("The walk curve has zero length")
    s = total * np.arange(views) / (views if closed else max(views - 1, 1))
    delta = min(total * 1e-3, 0.01)
    if closed:
        ahead, behind = np.mod(s + delta, total), np.mod(s - delta, total)
    else:
        ahead, behind = np.minimum(s + delta, total), np.maximum(s - delta, 0.0)
    tangent = _along(points, lengths, ahead) - _along(points, lengths, behind)
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    tangent = np.divide(tangent, norm, out=np.zeros_like(tangent), where=norm > 0)
    return _along(points, lengths, s), tangent


def place_walk(scene: bpy.types.Scene, curve_object: bpy.types.Object, views: int, lens: float
               ) -> list[bpy.types.Object]:
    """Cameras evenly spaced along the curve, each looking along it with a level horizon (no roll).

    An open curve gets a camera at both ends; a closed one spaces ``views`` cameras around the loop.
    Where the curve runs straight up or down, a camera keeps the heading of the one before it.
    """
    if views < 1:
        raise CameraError(f"Walk Views must be at least 1, got {views}")
    _check_lens(lens)
    points, closed = curve_polyline(curve_object)
    positions, tangents = walk_frames(points, closed, views)
    coll = _replace_placed(scene, _walk_placement(curve_object, views, lens))
    clip_start, clip_end = clip_range(scene, positions)
    placed = []
    heading = np.array([1.0, 0.0, 0.0])
    for index, (eye, forward) in enumerate(zip(positions, tangents, strict=True)):
        horizontal = np.linalg.norm(forward[:2])
        if horizontal < 1e-6:  # straight up or down: no defined horizon, keep the last heading
            forward = heading
        else:
            heading = np.array([forward[0], forward[1], 0.0]) / horizontal
        matrix = look_at(eye, eye + forward) @ BLENDER_TO_OPENCV_AXES
        placed.append(_new_camera(coll, f"MVDiffusion Walk {index:03d}", matrix, lens, clip_start,
                                  clip_end))
    return placed


def _check_lens(lens: float) -> None:
    if not (math.isfinite(lens) and lens > 0):
        raise CameraError(f"The Focal Length must be > 0 mm, got {lens} (setting 'lens')")


def _orbit_placement(targets, views_per_ring, rings, highest_elevation, distance_radii, lens) -> dict:
    return {"source": "ORBIT", "targets": sorted(o.name for o in targets), "views": int(views_per_ring),
            "rings": int(rings), "elevation": round(float(highest_elevation), 6),
            "distance": round(float(distance_radii), 6), "lens": round(float(lens), 6)}


def _walk_placement(curve_object, views, lens) -> dict:
    return {"source": "WALK", "curve": curve_object.name, "views": int(views), "lens": round(float(lens), 6)}


def _placement_for_settings(settings, targets) -> dict:
    if settings.camera_source == "ORBIT":
        return _orbit_placement(targets, settings.orbit_views, settings.orbit_rings, settings.orbit_elevation,
                                settings.orbit_distance, settings.lens)
    if settings.walk_curve is None:
        raise CameraError("Choose the curve to walk along (setting 'walk_curve')")
    return _walk_placement(settings.walk_curve, settings.walk_views, settings.lens)


def _scene_of(context_or_scene) -> bpy.types.Scene:
    return context_or_scene if isinstance(context_or_scene, bpy.types.Scene) else context_or_scene.scene


def place_for_settings(context_or_scene, settings, targets: Sequence[bpy.types.Object]) -> list[bpy.types.Object]:
    """Place the orbit or walk cameras the settings describe, replacing those placed before."""
    scene = _scene_of(context_or_scene)
    if settings.camera_source == "ORBIT":
        return place_orbit(scene, targets, settings.orbit_views, settings.orbit_rings, settings.orbit_elevation,
                           settings.orbit_distance, settings.lens)
    if settings.camera_source == "WALK":
        if settings.walk_curve is None:
            raise CameraError("Choose the curve to walk along (setting 'walk_curve')")
        return place_walk(scene, settings.walk_curve, settings.walk_views, settings.lens)
    raise CameraError(f"The camera source {settings.camera_source!r} does not place cameras")


def poses_for_settings(context_or_scene, settings, targets: Sequence[bpy.types.Object],
                       selected_objects: Iterable[bpy.types.Object]) -> list[Pose]:
    """The job's poses for ``settings.camera_source``.

    Orbit and walk reuse the cameras in the collection (the user may have edited them) unless they
    were placed for other settings (another source, view count, curve, targets...); then, or when
    there are none, they are placed first.
    """
    scene = _scene_of(context_or_scene)
    job_resolution(settings)
    source = settings.camera_source
    if source == "SELECTED":
        return poses_from_selected(selected_objects)
    if source == "ANIMATED":
        return poses_from_animation(scene, settings.animated_camera, settings.frame_start, settings.frame_end,
                                    settings.frame_step)
    if source not in ("ORBIT", "WALK"):
        raise CameraError(f"Unknown camera source {source!r}")
    wanted = _placement_for_settings(settings, targets)
    existing = placed_cameras(scene)
    coll = camera_collection(scene)
    recorded = coll.get(_PLACEMENT_KEY) if coll is not None else None
    if not existing or (recorded is not None and json.loads(recorded) != wanted):
        place_for_settings(scene, settings, targets)
        existing = placed_cameras(scene)
    return [pose_of(c) for c in existing]
