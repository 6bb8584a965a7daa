"""The pinhole camera model shared by the backend and the Blender add-on.

Conventions (one place for all of them):

* ``K`` is 3x3 in pixels with pixel centres at integer coordinates, so a centred principal point
  is ``((W - 1) / 2, (H - 1) / 2)``.
* ``cam_to_world`` is 4x4 in OpenCV camera axes: x right, y down, z forward.
* Depth is planar z along the view axis; 0 means nothing was hit.

Blender's conversion lives here too (:meth:`Camera.from_blender`), written once, and this module
imports only numpy so the add-on can use it inside Blender's own Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..validation import InputError, as_array, positive_int

BLENDER_TO_OPENCV_AXES = np.diag([1.0, -1.0, -1.0, 1.0])
"""Blender cameras look down -Z with +Y up; OpenCV cameras look down +Z with +Y down.

Flipping the camera's Y and Z axes converts either way (the matrix is its own inverse):
``cam_to_world = matrix_world @ BLENDER_TO_OPENCV_AXES`` and back with the same product."""

NEAR = 1e-4
"""Smallest planar depth a point may have to be seen; nearer points lie on or behind the camera plane."""


def pinhole(K, x, y, z):
    """Pixel coordinates of camera-space points (``x``, ``y``, ``z`` with z != 0): the one pinhole projection.

    Arithmetic only, so it serves numpy arrays and torch tensors alike; callers decide what
    happens at z <= :data:`NEAR` (masked, clamped or pushed far outside the image).
    """
    return K[0, 0] * x / z + K[0, 1] * y / z + K[0, 2], K[1, 1] * y / z + K[1, 2]


def inside(xy, width: int, height: int):
    """Pixel coordinates (..., 2) within the image: pixel centres at integers, its edges at -0.5 and size - 0.5."""
    return (xy[..., 0] >= -0.5) & (xy[..., 0] <= width - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] <= height - 0.5)


def frustum_sides(K: np.ndarray, width: int, height: int, p: np.ndarray) -> np.ndarray:
    """Signed sides (..., 5) of camera-space points to the view frustum's left, right, top, bottom and near planes.

    A point is seen exactly when every side is >= 0: then z > ``NEAR`` and its :func:`pinhole` pixel
    is :func:`inside` the image. Each side is linear in the point, so a box whose eight corners all
    lie outside one plane holds no visible point.
    """
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([
        K[0, 0] * x + K[0, 1] * y + (K[0, 2] + 0.5) * z,
        -K[0, 0] * x - K[0, 1] * y + (width - 0.5 - K[0, 2]) * z,
        K[1, 1] * y + (K[1, 2] + 0.5) * z,
        -K[1, 1] * y + (height - 0.5 - K[1, 2]) * z,
        z - NEAR,
    ], -1)


@dataclass(frozen=True, eq=False)
class Camera:
    """A validated pinhole camera. Construct through ``Camera(K, cam_to_world, width, height)``."""

    K: np.ndarray
    cam_to_world: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        width = positive_int("width", self.width)
        height = positive_int("height", self.height)
        K = as_array("K", self.K, shape=(3, 3), dtype=np.float64)
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InputError("K", f"focal lengths must be > 0, got fx={K[0, 0]}, fy={K[1, 1]}")
        if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0.0:
            raise InputError("K", "must be upper-triangular with last row (0, 0, 1)")
        pose = as_array("cam_to_world", self.cam_to_world, shape=(4, 4), dtype=np.float64)
        if not np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0]):
            raise InputError("cam_to_world", "last row must be (0, 0, 0, 1)")
        rotation = pose[:3, :3]
        if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0:
            raise InputError("cam_to_world", "rotation part must be orthonormal with determinant +1")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "cam_to_world", pose)
        K.flags.writeable = False
        pose.flags.writeable = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fov(
        cls, fov_x_deg: float, width: int, height: int, cam_to_world: np.ndarray | None = None
    ) -> Camera:
        """A centred camera with square pixels and the given horizontal field of view."""
        if cam_to_world is None:
            cam_to_world = np.eye(4)
        if not 0.0 < fov_x_deg < 180.0:
            raise InputError("fov_x_deg", f"must lie in (0, 180), got {fov_x_deg}")
        return cls(intrinsics_from_fov(fov_x_deg, width, height), cam_to_world, width, height)

    @classmethod
    def from_blender(
        cls,
        *,
        matrix_world: np.ndarray,
        lens: float,
        sensor_width: float,
        sensor_height: float,
        sensor_fit: str,
        shift_x: float,
        shift_y: float,
        width: int,
        height: int,
        pixel_aspect_x: float = 1.0,
        pixel_aspect_y: float = 1.0,
    ) -> Camera:
        """Convert a Blender perspective camera, following Blender's own view-plane computation.

        ``width`` and ``height`` are the final render size (resolution times percentage).
        The sensor size applies along the fitted axis; shift is in units of that axis' size, so
        the principal point moves by ``shift * viewfac`` pixels. Object scale is ignored, as
        Blender ignores it when rendering.
        """
        width = positive_int("width", width)
        height = positive_int("height", height)
        if sensor_fit not in ("AUTO", "HORIZONTAL", "VERTICAL"):
            raise InputError("sensor_fit", f"must be AUTO, HORIZONTAL or VERTICAL, got {sensor_fit!r}")
        for name, value in (("lens", lens), ("sensor_width", sensor_width),
                            ("sensor_height", sensor_height), ("pixel_aspect_x", pixel_aspect_x),
                            ("pixel_aspect_y", pixel_aspect_y)):
            if not math.isfinite(value) or value <= 0:
                raise InputError(name, f"must be > 0, got {value}")
        ycor = pixel_aspect_y / pixel_aspect_x
        sensor_size = sensor_height if sensor_fit == "VERTICAL" else sensor_width
        fit = sensor_fit
        if fit == "AUTO":
            fit = "HORIZONTAL" if pixel_aspect_x * width >= pixel_aspect_y * height else "VERTICAL"
        viewfac = width if fit == "HORIZONTAL" else ycor * height
        fx = lens * viewfac / sensor_size
        K = np.array([
            [fx, 0.0, (width - 1) / 2.0 - shift_x * viewfac],
            [0.0, fx / ycor, (height - 1) / 2.0 + shift_y * viewfac / ycor],
            [0.0, 0.0, 1.0],
        ])
        matrix = as_array("matrix_world", matrix_world, shape=(4, 4), dtype=np.float64)
        scale = np.linalg.norm(matrix[:3, :3], axis=0)
        if np.any(scale < 1e-12):
            raise InputError("matrix_world", "has a zero scale axis")
        pose = matrix.copy()
        pose[:3, :3] /= scale
        return cls(K, pose @ BLENDER_TO_OPENCV_AXES, width, height)

    # ------------------------------------------------------------------ derived quantities
    @property
    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation (columns are the camera's x, y, z axes in world space)."""
        return self.cam_to_world[:3, :3]

    @property
    def center(self) -> np.ndarray:
        return self.cam_to_world[:3, 3]

    @property
    def world_to_cam(self) -> np.ndarray:
        R, t = self.rotation, self.center
        out = np.eye(4)
        out[:3, :3] = R.T
        out[:3, 3] = -R.T @ t
        return out

    @property
    def fov_x_deg(self) -> float:
        return math.degrees(2.0 * math.atan(0.5 * self.width / self.K[0, 0]))

    def to_blender_matrix_world(self) -> np.ndarray:
        """The Blender ``matrix_world`` of this camera (looking down -Z, +Y up)."""
        return self.cam_to_world @ BLENDER_TO_OPENCV_AXES

    def scaled(self, factor: float) -> Camera:
        """The same camera at ``factor`` times the resolution, keeping pixel centres consistent."""
        width = max(1, round(self.width * factor))
        height = max(1, round(self.height * factor))
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
        # Pixel centres sit at integer coordinates, so scale about the image corner -0.5.
        K[0, 2] = (self.K[0, 2] + 0.5) * sx - 0.5
        K[1, 2] = (self.K[1, 2] + 0.5) * sy - 0.5
        return Camera(K, self.cam_to_world, width, height)

    # ------------------------------------------------------------------ projection
    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (..., 3) -> pixel coordinates (..., 2) and planar depth z (...,).

        Points behind the camera get z <= 0 and meaningless pixel coordinates: callers test z.
        """
        points = np.asarray(points_world)
        cam = self.world_to_cam
        R, t = cam[:3, :3].astype(points.dtype, copy=False), cam[:3, 3].astype(points.dtype, copy=False)
        p = points @ R.T + t
        z = p[..., 2]
        safe = np.where(np.abs(z) > 1e-12, z, 1e-12)
        x, y = pinhole(self.K.astype(points.dtype, copy=False), p[..., 0], p[..., 1], safe)
        return np.stack([x, y], axis=-1), z

    def ray_directions(self, xy: np.ndarray | None = None) -> np.ndarray:
        """World-space directions through pixels with unit z in camera space (scale by depth).

        Without ``xy`` this gives one direction per pixel, shape (H, W, 3).
        """
        if xy is None:
            xy = pixel_grid(self.width, self.height)
        xy = np.asarray(xy, dtype=np.float64)
        Kinv = np.linalg.inv(self.K)
        homogeneous = np.concatenate([xy, np.ones(xy.shape[:-1] + (1,))], axis=-1)
        return homogeneous @ (self.rotation @ Kinv).T

    def unproject(self, depth: np.ndarray, xy: np.ndarray | None = None) -> np.ndarray:
        """Planar depth -> world points. Full depth map (H, W) -> (H, W, 3) when ``xy`` is None."""
        depth = np.asarray(depth, dtype=np.float64)
        return self.center + self.ray_directions(xy) * depth[..., None]


def intrinsics_from_fov(fov_x_deg: float, width: int, height: int) -> np.ndarray:
    """K for square pixels, a centred principal point and the given horizontal field of view."""
    focal = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2.0)
    return np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def pixel_grid(width: int, height: int) -> np.ndarray:
    """Integer pixel-centre coordinates, shape (H, W, 2) as (x, y)."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack([xs, ys], axis=-1)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV cam_to_world for a camera at ``eye`` looking at ``target`` with world ``up`` (Z)."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    norm = np.linalg.norm(forward)
    if norm < 1e-12:
        raise InputError("target", "must differ from eye")
    forward /= norm
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise InputError("up", "must not be parallel to the viewing direction")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def yaw_pitch_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """OpenCV camera-to-world rotation in Blender world axes (Z up) for a yaw and a pitch.

    Yaw 0 looks along +X; positive yaw turns right (clockwise seen from above), which is the
    direction of increasing u in Cycles' equirectangular mapping. Positive pitch looks up.
    """
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    forward = np.array([math.cos(pitch) * math.cos(yaw), -math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
    right = np.array([-math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)
