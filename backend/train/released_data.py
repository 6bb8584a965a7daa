"""The released MVDiffusion training data, read without torch or OpenCV: ScanNet scenes and Matterport3D skyboxes.

Both readers follow the released loaders (``src/dataset/Scannet.py`` and ``Matterport3D.py``,
see section 10.3 of the MVDiffusion notes) and yield :class:`MultiViewSample` in the project's
conventions. Where the released code approximates, the approximation is kept (the models were
trained on it) and documented next to the code that makes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from ..geometry.cameras import Camera, yaw_pitch_rotation
from ..geometry.sampling import sample_bilinear
from ..validation import InputError, positive_int
from .samples import MultiViewSample, sample_index

# ---------------------------------------------------------------------------------------------- ScanNet
KEYFRAME_FILE = "key_frame_0.6.txt"
VALID_FRAMES_FILE = "valid_frames.npy"
INTRINSICS_FILE = os.path.join("intrinsic", "intrinsic_depth.txt")
DEPTH_SCALE = 1000.0  # ScanNet depth PNGs hold millimetres
ORTHONORMAL_TOLERANCE = 1e-3  # pose rotations further from orthonormal than this are treated as invalid


class ScanNetScenes:
    """Windows of ``views`` consecutive keyframes of ScanNet-style scenes, as depth samples.

    ``root`` holds one folder per scene (``split`` picks a subfolder such as ``"train"``, as the
    released configs point at ``data/scannet/train``; a sequence of scene ids keeps only those),
    each with ``color/<id>.jpg``, ``depth/<id>.png`` (uint16 mm), ``pose/<id>.txt`` (4x4
    camera-to-world, OpenCV axes as the project uses), ``intrinsic/intrinsic_depth.txt``,
    ``prompt/<id>.txt`` and optionally ``key_frame_0.6.txt`` and ``valid_frames.npy``.

    Frames: the keyframe file's ids when present, otherwise every ``color/*.jpg``, kept only if
    listed in ``valid_frames.npy`` (when present) and, as the released loader does, only if the
    colour image and the prompt exist (with ``default_prompt`` set, a missing or empty prompt
    file gives that prompt instead of dropping the frame). Poses are read once here: a frame
    whose pose is non-finite (ScanNet writes ``-inf`` where tracking failed), singular or not a
    rotation splits the frame list, and windows never cross it (the released loader re-samples
    such windows at random). Windows start every ``stride`` frames of each run of valid frames,
    plus one aligned to the run's end; ``stride=1`` is the released training set,
    ``stride=views`` gives non-overlapping test sequences. Scenes with no window are skipped and
    listed in :attr:`skipped` with the reason.

    Images are resized bilinearly and depths by nearest neighbour to ``width`` x ``height``
    exactly as ``cv2.resize`` does (``INTER_LINEAR`` without antialiasing, as the released code;
    ``antialias=True`` uses Pillow's antialiased bilinear instead). Depths come back in metres.

    Intrinsics, as released: ``K`` is the 3x3 part of ``intrinsic_depth.txt`` with rows 0 and 1
    divided by ``h_depth / height`` (480 / 192 = 2.5), and the same ``K`` serves the colour image.
    This is approximate twice over: ScanNet's colour camera (1296 x 968) has its own intrinsics
    and a slightly different aspect, so the resized colour image and the depth-based ``K`` differ
    by a few pixels at the borders; and scaling ``K`` directly ignores the half-pixel shift
    between pixel-centre conventions (the exact ``c' = (c + 0.5) / s - 0.5`` differs by 0.3 px
    at s = 2.5). Both rows use the height ratio, so a ``width`` / ``height`` aspect other than the
    depth image's distorts the geometry exactly as it would in the released loader.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = None,
        views: int = 12,
        width: int = 256,
        height: int = 192,
        stride: int = 1,
        *,
        default_prompt: str | None = None,
        antialias: bool = False,
    ) -> None:
        self.views = positive_int("views", views)
        self.width = positive_int("width", width)
        self.height = positive_int("height", height)
        self.stride = positive_int("stride", stride)
        if default_prompt is not None and not isinstance(default_prompt, str):
            raise InputError("default_prompt", f"must be a string or None, got {type(default_prompt).__name__}")
        self.default_prompt = default_prompt
        self.antialias = bool(antialias)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: ScanNet root folder not found")
        if isinstance(split, str):
            root = root / split
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: split folder not found")
            scene_ids = sorted(p.name for p in root.iterdir() if p.is_dir())
        elif split is None:
            scene_ids = sorted(p.name for p in root.iterdir() if p.is_dir())
        else:
            scene_ids = [str(s) for s in split]
            for scene in scene_ids:
                if not (root / scene).is_dir():
                    raise FileNotFoundError(f"{root / scene}: scene folder not found")
        self.root = root
        self.skipped: dict[str, str] = {}
        self._intrinsics: dict[str, np.ndarray] = {}
        self._poses: dict[tuple[str, int], np.ndarray] = {}
        self._windows: list[tuple[str, tuple[int, ...]]] = []
        for scene in scene_ids:
            self._index_scene(scene)
        if not self._windows:
            raise InputError(
                "root", f"no scene under {root} has {self.views} consecutive usable frames (skipped: {self.skipped})"
            )

    # ------------------------------------------------------------------ index
    def _index_scene(self, scene: str) -> None:
        folder = self.root / scene
        keyframe_path = folder / KEYFRAME_FILE
        if keyframe_path.is_file():
            frames = _read_ints(keyframe_path)
        else:
            colour_dir = folder / "color"
            if not colour_dir.is_dir():
                raise FileNotFoundError(f"{colour_dir}: colour folder not found")
            frames = sorted(int(p.stem) for p in colour_dir.glob("*.jpg") if p.stem.isdigit())
        valid_path = folder / VALID_FRAMES_FILE
        if valid_path.is_file():
            valid = set(np.load(valid_path, allow_pickle=False).astype(np.int64).ravel().tolist())
            frames = [f for f in frames if f in valid]
        frames = [
            f for f in frames
            if (folder / "color" / f"{f}.jpg").is_file()
            and (self.default_prompt is not None or (folder / "prompt" / f"{f}.txt").is_file())
        ]
        if len(frames) < self.views:
            self.skipped[scene] = f"{len(frames)} usable frames, need {self.views}"
            return
        runs: list[list[int]] = [[]]
        for frame in frames:
            pose = _valid_pose(_read_matrix(folder / "pose" / f"{frame}.txt", (4, 4)))
            if pose is None:
                if runs[-1]:
                    runs.append([])
                continue
            self._poses[(scene, frame)] = pose
            runs[-1].append(frame)
        windows = []
        for run in runs:
            if len(run) < self.views:
                continue
            starts = list(range(0, len(run) - self.views + 1, self.stride))
            if starts[-1] != len(run) - self.views:
                starts.append(len(run) - self.views)
            windows += [(scene, tuple(run[s:s + self.views])) for s in starts]
        if not windows:
            self.skipped[scene] = f"no {self.views} consecutive frames with valid poses"
            return
        self._intrinsics[scene] = _read_matrix(folder / INTRINSICS_FILE, (4, 4))[:3, :3]
        self._windows += windows

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._windows)

    def window(self, index: int) -> tuple[str, tuple[int, ...]]:
        """(scene id, frame ids) of sample ``index``."""
        return self._windows[sample_index(index, len(self))]

    def __getitem__(self, index: int) -> MultiViewSample:
        scene, frames = self.window(index)
        folder = self.root / scene
        images, depths, prompts = [], [], []
        depth_shape = None
        for frame in frames:
            images.append(self._colour(folder / "color" / f"{frame}.jpg"))
            depth_path = folder / "depth" / f"{frame}.png"
            raw = _read_depth(depth_path)
            if depth_shape is None:
                depth_shape = raw.shape
            elif raw.shape != depth_shape:
                raise InputError(str(depth_path), f"is {raw.shape[1]}x{raw.shape[0]}, the scene's first depth is "
                                 f"{depth_shape[1]}x{depth_shape[0]}")
            depths.append(resize_nearest(raw, self.width, self.height).astype(np.float32) / np.float32(DEPTH_SCALE))
            prompts.append(self._prompt(folder / "prompt" / f"{frame}.txt"))
        K = self._intrinsics[scene].copy()
        K[:2] /= depth_shape[0] / self.height  # released: k[:2] /= h_ori / resolution_h
        cameras = [Camera(K, self._poses[(scene, frame)], self.width, self.height) for frame in frames]
        return MultiViewSample(
            task="depth",
            images=np.stack(images),
            cameras=cameras,
            depths=np.stack(depths),
            prompts=prompts,
            keyframes=list(range(len(frames))),
            meta={"dataset": "scannet", "scene": scene, "frame_ids": list(frames)},
        )

    def _colour(self, path: Path) -> np.ndarray:
        image = _read_rgb(path)
        if self.antialias:
            from PIL import Image

            return np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.BILINEAR))
        return resize_bilinear(image, self.width, self.height)

    def _prompt(self, path: Path) -> str:
        return _text_or_default(path, self.default_prompt, "prompt")


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` with ``INTER_LINEAR``: half-pixel centres, no antialiasing.

    Output pixel x samples the input at ``(x + 0.5) * W_in / W_out - 0.5``, clamped to the image.
    uint8 in gives uint8 out (rounded).
    """
    src_h, src_w = image.shape[:2]
    xs = np.maximum((np.arange(width) + 0.5) * (src_w / width) - 0.5, 0.0)
    ys = np.maximum((np.arange(height) + 0.5) * (src_h / height) - 0.5, 0.0)
    x, y = np.meshgrid(xs, ys)
    out = sample_bilinear(image.astype(np.float32), x, y)
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


def resize_nearest(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize`` with ``INTER_NEAREST``: output pixel x copies input ``floor(x * W_in / W_out)``."""
    src_h, src_w = image.shape[:2]
    cols = np.minimum(np.floor(np.arange(width) * (src_w / width)).astype(np.int64), src_w - 1)
    rows = np.minimum(np.floor(np.arange(height) * (src_h / height)).astype(np.int64), src_h - 1)
    return image[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------- Matterport
SKYBOX_FACE_YAW_DEG = (-90, 270, 0, 90, 180, -90)  # released vx
SKYBOX_FACE_PITCH_DEG = (90, 0, 0, 0, 0, -90)  # released vy
SKYBOX_FOV_DEG = 90.0
RING_VIEWS = 8
RING_STEP_DEG = 45.0
RELEASED_PROMPT_PREFIX = "This is one view of a scene. "


def skybox_face_rotations() -> np.ndarray:
    """Camera-to-world rotations (6, 3, 3) of the six skybox faces, OpenCV axes in the project's Z-up world.

    Derived from the released ``warp_img``: it maps face i into a target camera at yaw ``t`` with
    ``K R K^-1``, ``R = get_K_R(vx[i] - t, vy[i])``, so the face's rotation is the target's
    rotation times ``R``; for every ``t`` this gives the same face (the released warp is
    consistent). Faces 1-4 are the horizontal views at yaw 270, 0, 90, 180 (positive yaw turns
    right, as :func:`yaw_pitch_rotation`); face 0 looks up (+Z) with image right = +X and image
    down = +Y, so its bottom edge meets face 1; face 5 looks down with image right = +X and image
    down = -Y, so its top edge meets face 1.
    """
    up = np.eye(3)
    down = np.diag([1.0, -1.0, -1.0])
    sides = [yaw_pitch_rotation(float(yaw), 0.0) for yaw in SKYBOX_FACE_YAW_DEG[1:5]]
    return np.stack([up, *sides, down])


def skybox_face_cameras(size: int) -> list[Camera]:
    """The six ``size`` x ``size`` face cameras (FOV 90) at the origin, in skybox order."""
    cameras = []
    for rotation in skybox_face_rotations():
        pose = np.eye(4)
        pose[:3, :3] = rotation
        cameras.append(Camera.from_fov(SKYBOX_FOV_DEG, size, size, pose))
    return cameras


def skybox_to_perspective(faces: Sequence[np.ndarray], camera: Camera, supersample: int = 1) -> np.ndarray:
    """Render a perspective view of a skybox: per target pixel, its ray, the face it hits, bilinear in that face.

    ``faces`` are six square images of one size in skybox order (see
    :func:`skybox_face_rotations`), uint8 (gives uint8, rounded) or float. The face a ray hits is
    the one whose viewing axis is closest to it, which is exact for a cube; lookups clamp at the
    face's outer half-pixel. ``supersample`` s averages s x s rays per pixel (a box filter, as
    the released warp at face resolution followed by a resize down does for s = face / view).
    Only the camera's rotation matters.
    """
    if not isinstance(camera, Camera):
        raise InputError("camera", f"must be a Camera, got {type(camera).__name__}")
    supersample = positive_int("supersample", supersample)
    stack, was_uint8 = _face_stack(faces)
    size = stack.shape[1]
    rotations = skybox_face_rotations()
    s = supersample
    offsets = (np.arange(s) + 0.5) / s - 0.5
    xs = (np.arange(camera.width)[:, None] + offsets[None, :]).ravel()
    ys = (np.arange(camera.height)[:, None] + offsets[None, :]).ravel()
    x, y = np.meshgrid(xs, ys)
    dirs = camera.ray_directions(np.stack([x, y], axis=-1)).reshape(-1, 3)
    axes = rotations[:, :, 2]  # each face's viewing axis in world space
    face = np.argmax(dirs @ axes.T, axis=1)
    focal = 0.5 * size / math.tan(math.radians(SKYBOX_FOV_DEG) / 2.0)
    centre = (size - 1) / 2.0
    out = np.empty((dirs.shape[0], stack.shape[3]), np.float32)
    for k in range(6):
        idx = np.flatnonzero(face == k)
        if not len(idx):
            continue
        local = dirs[idx] @ rotations[k]  # world -> face camera axes
        z = local[:, 2]
        out[idx] = sample_bilinear(stack[k], focal * local[:, 0] / z + centre, focal * local[:, 1] / z + centre)
    out = out.reshape(camera.height, s, camera.width, s, -1).mean(axis=(1, 3))
    if was_uint8:
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out


def _face_stack(faces: Sequence[np.ndarray]) -> tuple[np.ndarray, bool]:
    faces = list(faces)
    if len(faces) != 6:
        raise InputError("faces", f"a skybox has 6 faces, got {len(faces)}")
    arrays = [np.asarray(f) for f in faces]
    kinds = {a.dtype == np.uint8 for a in arrays}
    if len(kinds) > 1:
        raise InputError("faces", "mixes uint8 and float faces")
    first = arrays[0]
    for k, a in enumerate(arrays):
        if a.ndim != 3 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
            raise InputError(f"faces[{k}]", f"must be a square (S, S, C) image, got shape {a.shape}")
        if a.shape != first.shape:
            raise InputError(f"faces[{k}]", f"has shape {a.shape}, faces[0] has {first.shape}")
    was_uint8 = kinds == {True}
    stack = np.stack(arrays).astype(np.float32)
    if was_uint8:
        stack /= np.float32(255.0)
    return stack, was_uint8


class MatterportSkybox:
    """Matterport3D skyboxes as the released panorama loader sees them: 8 ring views, 45 degrees apart, FOV 90.

    ``root`` is the released ``image_root_dir`` (``data/mp3d_skybox``): ``<split>.npy`` lists per
    panorama its six face paths (relative to ``root``, under ``<scene>/matterport_skybox_images/``,
    in skybox order 0-5). View k looks at yaw ``yaw0 + 45 k`` (pitch 0); its camera is the ring
    view of :func:`backend.geometry.panorama.panorama_layout` at that yaw, so ``yaw0 = 0`` gives
    exactly the project's ring. ``yaw_offset`` fixes ``yaw0``; by default it is 0 for ``"test"``
    and, as released, a random integer degree in [0, 359] for ``"train"``, drawn from
    ``(seed, index, epoch)`` (call :meth:`set_epoch` to get new yaws each epoch).

    Views are rendered exactly from the faces (:func:`skybox_to_perspective`) rather than by the
    released sum of ``cv2.warpPerspective`` homographies; ``supersample`` defaults to
    ``face size // view_size`` (capped at 4), which matches the released warp at face resolution
    followed by a resize down.

    Prompts: ``<scene>/blip3/<pano>_<deg>.txt``, first line, with ``deg`` the view's yaw rounded to
    a multiple of 45 as released, prefixed with ``prompt_prefix`` (the released
    ``"This is one view of a scene. "``; pass ``""`` for the caption alone). A missing or empty
    caption is an error naming the file unless ``default_prompt`` is given, which is then used
    (before the prefix) for that view.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        view_size: int = 512,
        yaw_offset: float | None = None,
        seed: int = 0,
        *,
        prompt_prefix: str = RELEASED_PROMPT_PREFIX,
        default_prompt: str | None = None,
        supersample: int | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise InputError("split", f"must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.split = split
        self.view_size = positive_int("view_size", view_size)
        if yaw_offset is not None and not math.isfinite(float(yaw_offset)):
            raise InputError("yaw_offset", f"must be a finite number of degrees or None, got {yaw_offset!r}")
        self.yaw_offset = None if yaw_offset is None else float(yaw_offset)
        self.seed = int(seed)
        self.epoch = 0
        self.prompt_prefix = str(prompt_prefix)
        self.default_prompt = default_prompt
        self.supersample = None if supersample is None else positive_int("supersample", supersample)
        list_path = self.root / f"{split}.npy"
        if not list_path.is_file():
            raise FileNotFoundError(f"{list_path}: panorama list not found")
        data = np.load(list_path, allow_pickle=False)
        if data.ndim != 2 or data.shape[1] != 6 or data.dtype.kind not in "US":
            raise InputError(str(list_path), f"expected an (N, 6) array of face paths, got {data.dtype} {data.shape}")
        self.panoramas = [[str(p.decode() if isinstance(p, bytes) else p) for p in row] for row in data]

    def set_epoch(self, epoch: int) -> None:
        """Draw new training yaws: the random ``yaw0`` depends on (seed, index, epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.panoramas)

    def initial_yaw(self, index: int) -> float:
        """``yaw0`` of sample ``index`` in degrees."""
        index = sample_index(index, len(self))
        if self.yaw_offset is not None:
            return self.yaw_offset
        if self.split == "test":
            return 0.0
        return float(np.random.default_rng([self.seed, index, self.epoch]).integers(0, 360))

    def __getitem__(self, index: int) -> MultiViewSample:
        index = sample_index(index, len(self))
        paths = self.panoramas[index]
        faces = [_read_rgb(self.root / p) for p in paths]
        for k, face in enumerate(faces):
            if face.shape[0] != face.shape[1] or face.shape != faces[0].shape:
                raise InputError(str(self.root / paths[k]), f"skybox faces must be square and alike, got "
                                 f"{face.shape[1]}x{face.shape[0]} (face 0 is {faces[0].shape[1]}x{faces[0].shape[0]})")
        supersample = self.supersample or int(min(4, max(1, faces[0].shape[0] // self.view_size)))
        yaw0 = self.initial_yaw(index)
        yaws = [(yaw0 + RING_STEP_DEG * k) % 360.0 for k in range(RING_VIEWS)]
        cameras, images, prompts = [], [], []
        prompt_dir = self.root / os.path.dirname(paths[0].replace("matterport_skybox_images", "blip3"))
        pano = os.path.basename(paths[0]).split("_")[0]
        for yaw in yaws:
            pose = np.eye(4)
            pose[:3, :3] = yaw_pitch_rotation(yaw, 0.0)
            camera = Camera.from_fov(SKYBOX_FOV_DEG, self.view_size, self.view_size, pose)
            cameras.append(camera)
            images.append(skybox_to_perspective(faces, camera, supersample))
            degree = int(np.round(yaw / 45.0) * 45) % 360
            prompts.append(self.prompt_prefix + self._caption(prompt_dir / f"{pano}_{degree}.txt"))
        return MultiViewSample(
            task="panorama",
            images=np.stack(images),
            cameras=cameras,
            depths=None,
            prompts=prompts,
            keyframes=None,
            meta={"dataset": "matterport", "panorama": pano, "faces": paths, "yaws_deg": yaws},
        )

    def _caption(self, path: Path) -> str:
        return _text_or_default(path, self.default_prompt, "caption")


# ---------------------------------------------------------------------------------------------- file helpers

def _read_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        image = iio.imread(path)
    except Exception as exc:  # a corrupt or unsupported file: say which
        raise InputError(str(path), f"cannot be read as an image ({exc})") from None
    if image.dtype != np.uint8:
        raise InputError(str(path), f"expected an 8-bit image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(str(path), f"expected an RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def _read_depth(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: depth image not found")
    try:
        depth = iio.imread(path)
    except Exception as exc:
        raise InputError(str(path), f"cannot be read as an image ({exc})") from None
    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise InputError(str(path), f"expected a single-channel uint16 depth PNG (mm), got {depth.dtype} {depth.shape}")
    return depth


def _read_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: matrix file not found")
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise InputError(str(path), f"cannot be read as a matrix ({exc})") from None
    if matrix.shape != shape:
        raise InputError(str(path), f"expected a {shape[0]}x{shape[1]} matrix, got {matrix.shape}")
    return matrix


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except ValueError as exc:
        raise InputError(str(path), f"expected one integer frame id per line ({exc})") from None


def _text_or_default(path: Path, default: str | None, what: str) -> str:
    """A prompt file's first line; ``default`` when it is missing or empty, else an error naming the file."""
    text = _first_line(path)
    if text:
        return text
    if default is not None:
        return default
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    raise InputError(str(path), f"{what} file is empty")


def _first_line(path: Path) -> str:
    """The first line of a text file, stripped; '' when the file is missing or empty."""
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def _valid_pose(pose: np.ndarray) -> np.ndarray | None:
    """A usable camera-to-world matrix (rotation snapped to the nearest orthonormal one), or None."""
    if not np.isfinite(pose).all() or not np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        return None
    rotation = pose[:3, :3]
    if abs(np.linalg.det(rotation)) < 1e-6:
        return None
    u, _, vt = np.linalg.svd(rotation)
    snapped = u @ vt
    if np.linalg.det(snapped) < 0 or np.abs(snapped - rotation).max() > ORTHONORMAL_TOLERANCE:
        return None
    out = pose.copy()
    out[:3, :3] = snapped
    out[3] = (0.0, 0.0, 0.0, 1.0)
    return out
