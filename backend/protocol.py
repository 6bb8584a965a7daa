"""The wire format between Blender and the backend, defined once and imported by both halves.

A job travels as one ``.npz`` file: its arrays (cameras, depths, mesh) as ordinary numpy arrays
and its settings as UTF-8 JSON stored in a uint8 array named ``job.json``. It is always read with
``allow_pickle=False``, and its uncompressed size is checked before anything is decompressed, so
a file from the network can neither run code nor exhaust memory. Only numpy and the standard
library are used: Blender's own Python imports this module.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .geometry.cameras import Camera
from .geometry.mesh import Mesh
from .sampling_options import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, MODES, scheduler_name
from .validation import InputError, as_array, depth_map, in_range, positive_int

API_VERSION = 1
JOB_KINDS = ("texture", "panorama")
DEFAULT_MAX_BYTES = 2 * 2**30
META_KEY = "job.json"
NO_MULTIVIEW_WEIGHTS = "none"
"""``multiview_weights`` in ``/v1/version`` and ``report.json`` when the multi-view blocks stay at their
identity: every view is generated alone, and the add-on warns that views will not agree."""


def pack_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """Arrays (and a JSON-able ``meta``) as the bytes of an ``.npz`` file."""
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in payload.items():
        if value.dtype == object:
            raise InputError(name, "object arrays cannot be sent; use numeric arrays")
    if meta is not None:
        payload[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **payload)
    return buffer.getvalue()


def unpack_arrays(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and meta from ``.npz`` bytes; refuses pickles, non-npz data and oversized contents."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile:
        raise InputError("body", "is not an .npz file") from None
    if total > max_bytes:
        raise InputError("body", f"unpacks to {total} bytes, more than the limit of {max_bytes}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for name in archive.files:
                arrays[name] = archive[name]
    except ValueError as err:
        raise InputError("body", f"holds pickled objects, which are refused ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InputError("body", f"cannot be read as .npz ({err})") from None
    meta: dict[str, Any] = {}
    if META_KEY in arrays:
        try:
            meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(META_KEY, f"is not valid UTF-8 JSON ({err})") from None
        if not isinstance(meta, dict):
            raise InputError(META_KEY, "must hold a JSON object")
    return arrays, meta


@dataclass
class GenerationSettings:
    """What every generation job shares: prompts, guidance, seed, the scheduler and its steps.

    ``scheduler`` names an entry of ``backend.sampling_options.SCHEDULERS``; jobs that leave it
    out get the default (DDIM), as before the field existed. ``mode`` is one of :data:`MODES`, or
    None for the best the backend has.
    """

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER
    mode: str | None = None

    def validate(self) -> GenerationSettings:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InputError("prompts", "need at least one non-empty text prompt")
        if not isinstance(self.negative_prompt, str):
            raise InputError("negative_prompt", "must be text")
        self.steps = positive_int("steps", self.steps)
        if self.steps > 1000:
            raise InputError("steps", f"must be at most 1000, got {self.steps}")
        self.guidance_scale = in_range("guidance_scale", self.guidance_scale, 0.0, 100.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        self.scheduler = scheduler_name("scheduler", self.scheduler)
        if self.mode is not None and self.mode not in MODES:
            raise InputError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        return self


@dataclass
class TextureJob:
    """Texture meshes from views along a trajectory: cameras, their depths, the meshes."""

    settings: GenerationSettings
    cameras: list[Camera]
    depths: list[np.ndarray]
    mesh: Mesh
    texture_size: int = 1024
    object_names: list[str] = field(default_factory=list)
    texture_bits: int = 8  # 8 or 16 bits per channel in the texture PNG
    # Scene geometry that is not textured but hides textured surfaces from some views (furniture
    # left out of the job, a character in the room). The depth maps already include it.
    occluders: Mesh | None = None

    kind = "texture"

    def to_bytes(self) -> bytes:
        arrays = {
            "K": np.stack([c.K for c in self.cameras]),
            "cam_to_world": np.stack([c.cam_to_world for c in self.cameras]),
            "depths": np.stack(self.depths).astype(np.float32),
            "vertices": self.mesh.vertices,
            "triangles": self.mesh.triangles,
            "object_ids": self.mesh.object_ids,
        }
        if self.mesh.uvs is not None:
            arrays["uvs"] = self.mesh.uvs
        if self.occluders is not None:
            arrays["occluder_vertices"] = self.occluders.vertices
            arrays["occluder_triangles"] = self.occluders.triangles
        meta = {"api_version": API_VERSION, "kind": self.kind, "settings": asdict(self.settings),
                "texture_size": self.texture_size, "object_names": self.object_names,
                "texture_bits": self.texture_bits}
        return pack_arrays(arrays, meta)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TextureJob:
        _check_header(meta, cls.kind)
        settings = _settings(meta)
        K = as_array("K", _required(arrays, "K"), shape=(None, 3, 3), dtype=np.float64)
        poses = as_array("cam_to_world", _required(arrays, "cam_to_world"), shape=(len(K), 4, 4), dtype=np.float64)
        # Finiteness is checked per view below, so an error names the view (depths[k]).
        depths = as_array("depths", _required(arrays, "depths"), shape=(len(K), None, None), dtype=np.float32,
                          finite=False)
        if len(K) == 0:
            raise InputError("cameras", "need at least one camera")
        height, width = depths.shape[1:]
        cameras = []
        for k in range(len(K)):
            try:
                cameras.append(Camera(K[k], poses[k], width, height))
            except InputError as err:
                raise InputError(f"cameras[{k}].{err.field}", err.problem) from None
        depth_list = [depth_map(f"depths[{k}]", depths[k], height, width) for k in range(len(K))]
        mesh = Mesh(_required(arrays, "vertices"), _required(arrays, "triangles"), arrays.get("uvs"),
                    arrays.get("object_ids"))
        occluders = None
        if "occluder_vertices" in arrays or "occluder_triangles" in arrays:
            try:
                occluders = Mesh(_required(arrays, "occluder_vertices"), _required(arrays, "occluder_triangles"))
            except InputError as err:
                raise InputError(f"occluder_{err.field}", err.problem) from None
        job = cls(settings, cameras, depth_list, mesh, meta.get("texture_size", 1024),
                  meta.get("object_names", []), meta.get("texture_bits", 8), occluders)
        return job.validate()

    def validate(self) -> TextureJob:
        """Checks across fields (counts, sizes, names); the same for jobs read and jobs built in code."""
        self.settings.validate()
        prompts = [self.settings.prompts] if isinstance(self.settings.prompts, str) else self.settings.prompts
        views = len(self.cameras)
        if len(prompts) not in (1, views):
            raise InputError("prompts", f"expected one prompt or {views} (one per view), got {len(prompts)}")
        if len(self.depths) != views:
            raise InputError("depths", f"expected one depth map per camera ({views}), got {len(self.depths)}")
        size = positive_int("texture_size", self.texture_size)
        if not 64 <= size <= 8192:
            raise InputError("texture_size", f"must lie in [64, 8192], got {size}")
        names = self.object_names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError("object_names", "must be a list of names")
        if names and len(names) < self.mesh.num_objects:
            count = self.mesh.num_objects
            raise InputError("object_names", f"expected one name per object ({count}), got {len(names)}")
        if len(set(names)) != len(names):
            raise InputError("object_names", "must be unique (they name the arrays of uvs.npz)")
        if self.texture_bits not in (8, 16) or isinstance(self.texture_bits, bool):
            raise InputError("texture_bits", f"must be 8 or 16, got {self.texture_bits!r}")
        return self


@dataclass
class PanoramaJob:
    """A 360 environment from text (one prompt, or one per view of the layout)."""

    settings: GenerationSettings
    equirect_height: int = 1024
    view_size: int = 512

    kind = "panorama"

    def to_bytes(self) -> bytes:
        meta = {"api_version": API_VERSION, "kind": self.kind, "settings": asdict(self.settings),
                "equirect_height": self.equirect_height, "view_size": self.view_size}
        return pack_arrays({}, meta)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PanoramaJob:
        _check_header(meta, cls.kind)
        height = positive_int("equirect_height", meta.get("equirect_height", 1024))
        if not 64 <= height <= 8192:
            raise InputError("equirect_height", f"must lie in [64, 8192], got {height}")
        view = positive_int("view_size", meta.get("view_size", 512))
        if view % 64 or not 64 <= view <= 2048:
            raise InputError("view_size", f"must be a multiple of 64 in [64, 2048], got {view}")
        return cls(_settings(meta), height, view)


def read_job(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> TextureJob | PanoramaJob:
    """A validated job from ``.npz`` bytes; every problem raises InputError naming its field."""
    arrays, meta = unpack_arrays(data, max_bytes)
    kind = meta.get("kind")
    if kind not in JOB_KINDS:
        raise InputError("kind", f"must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
    return (TextureJob if kind == "texture" else PanoramaJob).from_arrays(arrays, meta)


def _check_header(meta: dict[str, Any], kind: str) -> None:
    version = meta.get("api_version")
    if version != API_VERSION:
        raise InputError("api_version", f"this backend speaks API version {API_VERSION}, the job says {version!r}")
    if meta.get("kind") != kind:
        raise InputError("kind", f"expected {kind!r}, got {meta.get('kind')!r}")


def _settings(meta: dict[str, Any]) -> GenerationSettings:
    raw = meta.get("settings")
    if not isinstance(raw, dict):
        raise InputError("settings", "missing or not an object")
    unknown = set(raw) - set(GenerationSettings.__dataclass_fields__)
    if unknown:
        raise InputError("settings", f"unknown field(s): {', '.join(sorted(unknown))}")
    if "prompts" not in raw:
        raise InputError("prompts", "missing")
    return GenerationSettings(**raw).validate()


def _required(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise InputError(name, "missing from the job")
    return arrays[name]
