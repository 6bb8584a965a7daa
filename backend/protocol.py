"""The wire format between Blender and the backend, defined once and imported by both halves.

A job travels as one ``.npz`` file: its arrays (cameras, depths, mesh) as ordinary numpy arrays
and its settings as UTF-8 JSON stored in a uint8 array named ``job.json``. It is always read with
``allow_pickle=False``, and its uncompressed size is checked before anything is decompressed, so
a file from the network can neither run code nor exhaust memory. Only numpy and the standard
library are used: Blender's own Python imports this module.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .geometry.cameras import Camera
from .geometry.mesh import Mesh
from .npz import ArrayHeader, Source, load_arrays, read_headers
from .sampling_options import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, MODES, scheduler_name
from .validation import InputError, as_array, depth_map, in_range, positive_int, rgb_image

API_VERSION = 1
JOB_KINDS = ("texture", "panorama")
DEFAULT_MAX_BYTES = 2 * 2**30
META_KEY = "job.json"
TOKEN_ENV = "MVDIFF_TOKEN"
"""The environment variable that gives ``serve`` its access token (never the command line: ``ps`` shows that)."""
INSTANCE_ENV = "MVDIFF_INSTANCE_ID"
"""The environment variable that gives ``serve`` an id to report in ``/v1/version``, so whoever started
it can tell its own process from another program listening on the same port."""
MAX_META_BYTES = 16 * 2**20
MAX_NAME_LENGTH = 255
NO_MULTIVIEW_WEIGHTS = "none"
"""``multiview_weights`` in ``/v1/version`` and ``report.json`` when the multi-view blocks stay at their
identity: every view is generated alone, and the add-on warns that views will not agree."""
VIEW_MULTIPLE = 64
"""Every generated view's width and height is a multiple of this: the autoencoder's factor 8 times the
UNet's three halvings (Stable Diffusion 2)."""
PANORAMA_RING_VIEWS = 8
PANORAMA_VIEWS = PANORAMA_RING_VIEWS + 2
PANORAMA_VIEW_ORDER = f"{PANORAMA_RING_VIEWS} around from +X turning right, then top and bottom"
"""A panorama job's views, in the order of per-view prompts."""
MAX_IMAGE_SIDE = 8192
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
"""States of a job in ``/v1/jobs/ID``; a job in a final state changes no more."""
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def view_side(field: str, value: Any, low: int = VIEW_MULTIPLE, high: int = 8192) -> int:
    """A view's width or height: a positive multiple of :data:`VIEW_MULTIPLE` in [low, high]."""
    value = positive_int(field, value)
    if value % VIEW_MULTIPLE or not low <= value <= high:
        raise InputError(field, f"must be a multiple of {VIEW_MULTIPLE} in [{low}, {high}], got {value}")
    return value


def check_prompt_count(count: int, views: int, order: str = "") -> None:
    """One prompt for every view, or one per view (in ``order`` when the views have one)."""
    if count not in (1, views):
        detail = f": {order}" if order else ""
        raise InputError("prompts", f"expected one prompt or {views} (one per view{detail}), got {count}")


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (127.0.0.0/8, ::1, localhost; names are resolved)."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


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


def unpack_arrays(source: Source, max_bytes: int = DEFAULT_MAX_BYTES,
                  admit: Callable[[dict[str, ArrayHeader], dict[str, Any]], None] | None = None,
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and meta from ``.npz`` bytes or a file; refuses pickles, non-npz data and oversized contents.

    ``admit`` sees every array's declared shape and the meta before any other array is loaded, so
    a caller can refuse a job that would not fit from a few kilobytes of headers.
    """
    headers = read_headers(source, max_bytes)
    meta = _read_meta(source, headers)
    if admit is not None:
        admit(headers, meta)
    arrays = load_arrays(source, max_bytes)
    arrays.pop(META_KEY, None)
    return arrays, meta


def _read_meta(source: Source, headers: dict[str, ArrayHeader]) -> dict[str, Any]:
    header = headers.get(META_KEY)
    if header is None:
        return {}
    if len(header.shape) != 1 or header.dtype != np.uint8 or header.nbytes > MAX_META_BYTES:
        raise InputError(META_KEY, f"must be UTF-8 JSON bytes (uint8, at most {MAX_META_BYTES} bytes)")
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        with archive.open(META_KEY + ".npy") as member:
            raw = np.lib.format.read_array(member, allow_pickle=False)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except RecursionError:
        raise InputError(META_KEY, "is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: bad JSON, or an integer of over 4300 digits
        raise InputError(META_KEY, f"is not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(META_KEY, "must hold a JSON object")
    return meta


def check_name(field: str, name: object) -> str:
    """An object name as it may travel: text, 1 to ``MAX_NAME_LENGTH`` characters, no control characters
    (a NUL would cut it short as an array name in ``uvs.npz``)."""
    if not isinstance(name, str) or not name:
        raise InputError(field, "must be a non-empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(field, f"is longer than {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(field, f"holds control characters: {name!r}")
    return name


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
        if self.mesh.polygon_ids is not None:
            arrays["polygon_ids"] = self.mesh.polygon_ids
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
                    arrays.get("object_ids"), arrays.get("polygon_ids"))
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
        views = len(self.cameras)
        check_prompt_count(len(self.settings.prompts), views)
        if len(self.depths) != views:
            raise InputError("depths", f"expected one depth map per camera ({views}), got {len(self.depths)}")
        size = positive_int("texture_size", self.texture_size)
        if not 64 <= size <= 8192:
            raise InputError("texture_size", f"must lie in [64, 8192], got {size}")
        names = self.object_names
        if not isinstance(names, list):
            raise InputError("object_names", "must be a list of names")
        for index, name in enumerate(names):
            check_name(f"object_names[{index}]", name)
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
    """A 360 environment from text: one prompt, or one per view of the layout (:data:`PANORAMA_VIEW_ORDER`).

    ``view_size``: pixels of each square view; ``None`` is the base model's native size (512 for
    SD 1.5 and SD 2, 1024 for SDXL: ``native_view_size`` of ``/v1/version``'s task).
    ``image`` (optional, uint8 (H, W, 3) sRGB, a photo or a render): the environment is generated
    around it, and it stays the front view (facing +X, the equirect's centre). Any size: its
    centre square is scaled to the view size.
    """

    settings: GenerationSettings
    equirect_height: int = 1024
    view_size: int | None = None
    image: np.ndarray | None = None

    kind = "panorama"

    def to_bytes(self) -> bytes:
        meta = {"api_version": API_VERSION, "kind": self.kind, "settings": asdict(self.settings),
                "equirect_height": self.equirect_height, "view_size": self.view_size}
        return pack_arrays({} if self.image is None else {"image": np.asarray(self.image)}, meta)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PanoramaJob:
        _check_header(meta, cls.kind)
        return cls(_settings(meta), meta.get("equirect_height", 1024), meta.get("view_size"),
                   arrays.get("image")).validate()

    def validate(self) -> PanoramaJob:
        """Every check of a panorama job; the same for jobs read, jobs built in code and the add-on's."""
        self.settings.validate()
        check_prompt_count(len(self.settings.prompts), PANORAMA_VIEWS, PANORAMA_VIEW_ORDER)
        self.equirect_height = positive_int("equirect_height", self.equirect_height)
        if not 64 <= self.equirect_height <= 8192:
            raise InputError("equirect_height", f"must lie in [64, 8192], got {self.equirect_height}")
        if self.view_size is not None:
            self.view_size = view_side("view_size", self.view_size, high=2048)
        if self.image is not None:
            self.image = rgb_image("image", self.image)
            if min(self.image.shape[:2]) < 8 or max(self.image.shape[:2]) > MAX_IMAGE_SIDE:
                raise InputError("image", f"sides must lie in [8, {MAX_IMAGE_SIDE}], got {self.image.shape[1]} x "
                                          f"{self.image.shape[0]}")
        return self


def read_job(source: Source, max_bytes: int = DEFAULT_MAX_BYTES,
             admit: Callable[[dict[str, ArrayHeader], dict[str, Any]], None] | None = None,
             ) -> TextureJob | PanoramaJob:
    """A validated job from ``.npz`` bytes or a file; every problem raises InputError naming its field.

    ``admit`` is called with the array headers and the meta before the arrays load (see
    :func:`unpack_arrays`)."""
    arrays, meta = unpack_arrays(source, max_bytes, admit)
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
