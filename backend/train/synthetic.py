"""Procedural training data rendered with the project's own reference renderer.

Deterministic per ``(seed, split, index)`` and cheap enough to generate inside a training loop:

* :class:`SyntheticDepthData` (here): the demo room (furniture nudged around, every object painted with
  a random pattern from a small vocabulary in random named colours) seen along a random arc of
  a camera loop. Images come from :func:`render_textured`, depths are the same raster's planar
  depth (what :func:`render_depth` returns), and each view's prompt names the objects it shows
  with their colours and patterns.
* :class:`~.synthetic_panorama.SyntheticPanoramaData`: procedural equirect landscapes (sky gradient, clouds, sun or
  moon, mountains, ground, coloured towers and balloons) cut into the project's panorama layout
  with the project's equirect sampler, with per-view prompts of what each view shows.

Textures are functions of world position evaluated at the texel centres of one UV atlas of the
room, built once per process and texture size (``_room_cache``), so they are seamless across UV
charts and every sample only repaints the texels. The patterns are smooth at the scale of a few
centimetres (soft edges, periods of 0.3 m and up), so views at 64 x 48 alias little and views of
one sample agree where they overlap.

Splits are disjoint by construction. Every sample draws from the random stream
``SeedSequence([seed, split_code, index])`` (train 0, heldout 1), so held-out textures, layouts
and panoramas come from streams training never uses. For the depth set the held-out camera
loops are also geometrically apart: the base eye height is drawn from [1.25, 1.45] m for train
and [1.55, 1.65] m for heldout, and the eye bobs at most 0.04 m around it, so every held-out
camera centre sits at least 2 cm above every training camera centre (1.49 m), whatever the
indices. The held-out set is therefore a mild shift in height, on top of unseen textures.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry.cameras import Camera, look_at
from ..geometry.mesh import Mesh
from ..geometry.raster import rasterize_uv
from ..geometry.render import render_textured
from ..geometry.uv_atlas import ensure_uvs
from ..scenes.demo_room import build_demo_room
from ..validation import InputError, positive_int
from .samples import MultiViewSample, sample_index
from .synthetic_common import PALETTE, SPLITS, article, draw_waves, join, luminance, noise, smoothstep

LIGHT_COLOURS = ("white", "beige", "grey")
PATTERNS = ("solid", "stripes", "checker", "planks", "blotches")
PATTERN_WORDS = {"solid": "", "stripes": "striped", "checker": "checkered", "planks": "plank", "blotches": "mottled"}
CURVED_OBJECTS = ("column", "ball", "lamp")  # no in-plane patterns (checker, planks) on curved surfaces
OBJECT_NOUNS = {
    "floor": "floor", "ceiling": "ceiling", "walls": "walls", "table": "table", "cabinet": "cabinet",
    "sofa": "sofa", "column": "column", "ball": "ball", "lamp": "lamp",
}
SHELL_ORDER = ("walls", "floor", "ceiling")
MIN_VISIBLE_SHARE = 0.03  # an object covering less of a view is left out of its prompt

# Furniture translations (x range, y range) in metres; the lamp rides on the table. The ranges
# keep every piece inside the room, off the walls it does not touch and clear of the others.
FURNITURE_JITTER = {
    "table": ((-0.3, 0.3), (-0.25, 0.25)),
    "sofa": ((-0.3, 0.3), (-0.3, 0.0)),
    "cabinet": ((0.0, 0.0), (-0.6, 0.6)),
    "column": ((-0.2, 0.2), (-0.2, 0.2)),
    "ball": ((-0.2, 0.2), (-0.2, 0.2)),
}
FURNITURE_FOLLOWS = {"lamp": "table"}

TRAIN_EYE_HEIGHT = (1.25, 1.45)
HELDOUT_EYE_HEIGHT = (1.55, 1.65)
EYE_BOB = 0.04  # largest change of eye height along a loop
FOV_RANGE = (60.0, 80.0)
STEP_RANGE = (15.0, 25.0)  # degrees around the loop between consecutive views: about half of a view overlaps


# ============================================================================================ depth data
@dataclass(frozen=True)
class Material:
    """One object's paint: a pattern, its named colours (1 or 2) and the RGB actually used (2, 3)."""

    pattern: str
    colour_names: tuple[str, ...]
    rgb: np.ndarray
    params: dict

    def phrase(self) -> str:
        """'red', 'red checkered', 'blue and white striped', 'brown plank'."""
        colours = " and ".join(self.colour_names)
        word = PATTERN_WORDS[self.pattern]
        return f"{colours} {word}" if word else colours


@dataclass(frozen=True, eq=False)
class _RoomCache:
    """The demo room unwrapped once: everything that does not change between samples."""

    object_names: list[str]
    mesh: Mesh  # with UVs
    vertex_object: np.ndarray  # (N,) object index of every vertex
    texture_size: int
    texel_position: np.ndarray  # (n, 3) float64 world position (base layout) of every covered texel
    texel_normal: np.ndarray  # (n, 3)
    texel_object: np.ndarray  # (n,) object index
    fill: np.ndarray  # (S * S,) covered texel whose colour each texel takes (itself, or the nearest for gutters)


@functools.lru_cache(maxsize=4)
def _room_cache(texture_size: int) -> _RoomCache:
    room = build_demo_room()
    atlas = ensure_uvs(room.mesh, resolution=texture_size, padding=2)
    mesh = atlas.mesh
    vertex_object = np.zeros(len(mesh.vertices), np.int64)
    vertex_object[mesh.triangles] = mesh.object_ids[:, None]
    surface = rasterize_uv(mesh, texture_size)
    covered = surface.covered.ravel()
    flat = np.flatnonzero(covered)
    ordinal = np.full(covered.size, -1, np.int64)
    ordinal[flat] = np.arange(len(flat))
    _, (rows, cols) = ndimage.distance_transform_edt(~surface.covered, return_indices=True)
    fill = ordinal[(rows * texture_size + cols).ravel()]
    triangle = surface.triangle.ravel()[flat]
    return _RoomCache(
        object_names=list(room.object_names),
        mesh=mesh,
        vertex_object=vertex_object,
        texture_size=texture_size,
        texel_position=surface.position.reshape(-1, 3)[flat].astype(np.float64),
        texel_normal=surface.normal.reshape(-1, 3)[flat].astype(np.float64),
        texel_object=mesh.object_ids[triangle].astype(np.int64),
        fill=fill,
    )


def default_texture_size(width: int) -> int:
    """Atlas size for views ``width`` wide: about one texel per pixel at 1-2 m (256 for 64, 1024 for 256)."""
    size = 256
    while size < 4 * width and size < 2048:
        size *= 2
    return size


class SyntheticDepthData:
    """``count`` procedural depth samples of ``views`` views, ``width`` x ``height``; see the module docstring.

    ``texture_size`` defaults to :func:`default_texture_size`. ``layout_jitter`` nudges the
    furniture (see ``FURNITURE_JITTER``). Every view's prompt names the objects covering at
    least 3 % of it ("a room with blue striped walls, a brown plank floor and a red sofa").
    ``meta`` holds the recipe: ``materials`` (per object: pattern, colour names, RGB),
    ``trajectory`` (the loop's parameters), ``offsets`` (furniture moves), ``visible`` (per
    view, object -> pixel share) and ``object_ids`` (int16 (V, H, W) index into
    ``materials``' order, -1 where nothing was hit).
    """

    def __init__(
        self,
        count: int,
        views: int = 8,
        width: int = 64,
        height: int = 48,
        seed: int = 0,
        split: str = "train",
        *,
        texture_size: int | None = None,
        layout_jitter: bool = True,
        step_deg: tuple[float, float] = STEP_RANGE,
    ) -> None:
        self.count = positive_int("count", count)
        self.views = positive_int("views", views)
        self.width = positive_int("width", width)
        self.height = positive_int("height", height)
        if split not in SPLITS:
            raise InputError("split", f"must be one of {tuple(SPLITS)}, got {split!r}")
        self.split = split
        self.seed = int(seed)
        self.texture_size = default_texture_size(self.width) if texture_size is None else positive_int(
            "texture_size", texture_size)
        self.layout_jitter = bool(layout_jitter)
        self.step_deg = _step_range(step_deg)

    def __len__(self) -> int:
        return self.count

    def _streams(self, index: int) -> list[np.random.Generator]:
        index = sample_index(index, self.count)
        sequence = np.random.SeedSequence([self.seed, SPLITS[self.split], index])
        return [np.random.default_rng(s) for s in sequence.spawn(3)]

    def cameras(self, index: int) -> list[Camera]:
        """The cameras of sample ``index`` without rendering it."""
        return _loop_cameras(self._streams(index)[0], self.views, self.width, self.height, self.split,
                             self.step_deg)[0]

    def scene_mesh(self, index: int) -> Mesh:
        """The UV-mapped mesh sample ``index`` shows, its furniture moved as in that sample."""
        return self._mesh(_room_cache(self.texture_size), self._streams(index)[2])[0]

    def _mesh(self, cache: _RoomCache, layout_rng: np.random.Generator) -> tuple[Mesh, np.ndarray]:
        names = cache.object_names
        offsets = _furniture_offsets(layout_rng, names) if self.layout_jitter else np.zeros((len(names), 3))
        mesh = cache.mesh
        if np.any(offsets):
            mesh = Mesh(mesh.vertices + offsets[cache.vertex_object].astype(np.float32), mesh.triangles,
                        mesh.uvs, mesh.object_ids)
        return mesh, offsets

    def __getitem__(self, index: int) -> MultiViewSample:
        trajectory_rng, texture_rng, layout_rng = self._streams(index)
        cameras, trajectory = _loop_cameras(
            trajectory_rng, self.views, self.width, self.height, self.split, self.step_deg)
        cache = _room_cache(self.texture_size)
        names = cache.object_names
        materials = {name: _draw_material(texture_rng, name) for name in names}
        texture = _paint_texture(cache, materials)
        mesh, offsets = self._mesh(cache, layout_rng)
        images, depths, prompts, visible, object_maps = [], [], [], [], []
        for camera in cameras:
            view = render_textured(mesh, texture, camera)
            images.append(view.image)
            depths.append(view.depth)
            hit = view.triangle >= 0
            object_maps.append(np.where(hit, mesh.object_ids[np.maximum(view.triangle, 0)], -1).astype(np.int16))
            counts = np.bincount(mesh.object_ids[view.triangle[hit]], minlength=len(names))
            shares = {names[k]: float(counts[k]) / hit.size for k in np.flatnonzero(counts)}
            visible.append(shares)
            prompts.append(_room_prompt(shares, materials))
        return MultiViewSample(
            task="depth",
            images=np.stack(images),
            cameras=cameras,
            depths=np.stack(depths).astype(np.float32),
            prompts=prompts,
            keyframes=list(range(self.views)),
            meta={
                "dataset": "synthetic-depth",
                "split": self.split,
                "seed": self.seed,
                "index": sample_index(index, self.count),
                "materials": {
                    name: {"pattern": m.pattern, "colours": list(m.colour_names), "rgb": m.rgb.copy()}
                    for name, m in materials.items()
                },
                "trajectory": trajectory,
                "offsets": {names[k]: offsets[k].copy() for k in range(len(names)) if np.any(offsets[k])},
                "visible": visible,
                "object_ids": np.stack(object_maps),
            },
        )


def _step_range(step_deg: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in step_deg)
    if not (0.0 < low <= high <= 90.0):
        raise InputError("step_deg", f"must be (low, high) with 0 < low <= high <= 90 degrees, got {step_deg}")
    return low, high


def _loop_cameras(
    rng: np.random.Generator, views: int, width: int, height: int, split: str,
    step_deg: tuple[float, float] = STEP_RANGE,
):
    """``views`` cameras on an arc of a random loop through the room, looking outwards."""
    heights = TRAIN_EYE_HEIGHT if split == "train" else HELDOUT_EYE_HEIGHT
    params = {
        "centre": (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.25, 0.25))),
        "radii": (float(rng.uniform(0.9, 1.4)), float(rng.uniform(0.6, 1.0))),
        "eye_height": float(rng.uniform(*heights)),
        "bob_phase": float(rng.uniform(0, 2 * math.pi)),
        "start": float(rng.uniform(0, 2 * math.pi)),
        "step_deg": float(rng.uniform(*step_deg)),
        "direction": int(rng.choice([-1, 1])),
        "yaw_bias": float(rng.uniform(-0.4, 0.4)),
        "yaw_wobble": float(rng.uniform(0.0, 0.3)),
        "wobble_phase": float(rng.uniform(0, 2 * math.pi)),
        "pitch_deg": float(rng.uniform(-20.0, -8.0)),
        "pitch_swing_deg": float(rng.uniform(0.0, 8.0)),
        "pitch_phase": float(rng.uniform(0, 2 * math.pi)),
        "fov_deg": float(rng.uniform(*FOV_RANGE)),
    }
    cx, cy = params["centre"]
    rx, ry = params["radii"]
    cameras = []
    for k in range(views):
        angle = params["start"] + params["direction"] * k * math.radians(params["step_deg"])
        eye = np.array([
            cx + rx * math.cos(angle),
            cy + ry * math.sin(angle),
            params["eye_height"] + EYE_BOB * math.sin(2 * angle + params["bob_phase"]),
        ])
        yaw = angle + params["yaw_bias"] + params["yaw_wobble"] * math.sin(2 * angle + params["wobble_phase"])
        pitch = math.radians(params["pitch_deg"] + params["pitch_swing_deg"]
                             * math.sin(2 * angle + params["pitch_phase"]))
        direction = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
        cameras.append(Camera.from_fov(params["fov_deg"], width, height, look_at(eye, eye + direction)))
    return cameras, params


def _furniture_offsets(rng: np.random.Generator, names: list[str]) -> np.ndarray:
    offsets = np.zeros((len(names), 3))
    for k, name in enumerate(names):
        if name in FURNITURE_JITTER:
            (x0, x1), (y0, y1) = FURNITURE_JITTER[name]
            offsets[k, :2] = rng.uniform(x0, x1), rng.uniform(y0, y1)
    for follower, leader in FURNITURE_FOLLOWS.items():
        if follower in names and leader in names:
            offsets[names.index(follower)] = offsets[names.index(leader)]
    return offsets


def _draw_material(rng: np.random.Generator, name: str) -> Material:
    if name == "ceiling":
        patterns = ("solid", "solid", "blotches", "planks")
        first = str(rng.choice(LIGHT_COLOURS))
    else:
        patterns = ("solid", "stripes", "blotches") if name in CURVED_OBJECTS else PATTERNS
        first = str(rng.choice(list(PALETTE)))
    pattern = str(rng.choice(patterns))
    c1 = np.array(PALETTE[first])
    names: tuple[str, ...] = (first,)
    if pattern in ("stripes", "checker", "blotches") and rng.random() < 0.5:
        others = [c for c in PALETTE if np.linalg.norm(np.array(PALETTE[c]) - c1) > 0.35]
        second = str(rng.choice(others))
        c2 = np.array(PALETTE[second])
        names = (first, second)
    else:  # a shade of the first colour: darker for light colours, lighter for dark ones
        c2 = c1 * 0.6 if luminance(c1) > 0.45 else c1 + (1.0 - c1) * 0.45
    rgb = np.clip(np.stack([c1, c2]) + rng.uniform(-0.03, 0.03, size=(2, 3)), 0.0, 1.0)
    params = {
        "period": float(rng.uniform(0.3, 0.7)),
        "phase": rng.uniform(0, 2 * math.pi, size=2),
        "waves": draw_waves(rng, 4, (0.5, 1.4)),
        "shading": draw_waves(rng, 3, (1.0, 3.0)),
        "swap": bool(rng.random() < 0.5),
        "plank_width": float(rng.uniform(0.2, 0.4)),
        "plank_shades": rng.uniform(0.8, 1.1, size=64),
    }
    if name == "walls":
        if rng.random() < 0.3:
            params["direction"] = np.array([0.0, 0.0, 1.0])
        else:
            theta = math.radians(rng.uniform(30.0, 60.0) + 90.0 * rng.integers(4))
            params["direction"] = np.array([math.cos(theta), math.sin(theta), 0.0])
    elif name in ("floor", "ceiling"):
        theta = rng.uniform(0, 2 * math.pi)
        params["direction"] = np.array([math.cos(theta), math.sin(theta), 0.0])
    else:  # stripes must show on every face of a box: no component near zero
        d = rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.7, 1.3, size=3)
        params["direction"] = d / np.linalg.norm(d)
    return Material(pattern, names, rgb, params)






def _in_plane(p: np.ndarray, normal: np.ndarray, swap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two coordinates along the face (for axis-aligned faces); v is vertical on vertical faces."""
    axis = np.argmax(np.abs(normal), axis=1)
    u = np.where(axis == 0, p[:, 1], p[:, 0])
    v = np.where(axis == 2, p[:, 1], p[:, 2])
    if swap:
        horizontal = axis == 2
        u, v = np.where(horizontal, v, u), np.where(horizontal, u, v)
    return u, v




def _shade(material: Material, p: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """sRGB colours (n, 3) in [0, 1] of the material at base-layout positions ``p``."""
    params = material.params
    c1, c2 = material.rgb
    sharp = 3.0
    if material.pattern == "solid":
        w = np.zeros(len(p))
    elif material.pattern == "stripes":
        s = p @ params["direction"] / params["period"]
        w = 0.5 + 0.5 * np.tanh(sharp * np.sin(2 * math.pi * s + params["phase"][0]))
    elif material.pattern == "checker":
        u, v = _in_plane(p, normal, params["swap"])
        cell = params["period"]
        w = 0.5 + 0.5 * np.tanh(sharp * np.sin(math.pi * u / cell + params["phase"][0])) * np.tanh(
            sharp * np.sin(math.pi * v / cell + params["phase"][1]))
    elif material.pattern == "blotches":
        w = 0.5 + 0.5 * np.tanh(2.0 * noise(p, params["waves"]))
    elif material.pattern == "planks":
        u, v = _in_plane(p, normal, params["swap"])
        t = v / params["plank_width"] + params["phase"][0]
        i = np.floor(t).astype(np.int64)
        f = t - i
        shades = params["plank_shades"]
        b0, b1 = shades[i % len(shades)], shades[(i + 1) % len(shades)]
        brightness = b0 + (b1 - b0) * smoothstep(0.85, 1.0, f)
        grain = 1.0 + 0.05 * np.sin(2 * math.pi * (u / 0.6 + 0.3 * t))
        c1 = np.clip(c1 * (brightness * grain)[:, None], 0.0, 1.0)
        w = 0.8 * np.exp(-((np.minimum(f, 1.0 - f) / 0.06) ** 2))
    else:  # pragma: no cover - patterns come from PATTERNS
        raise AssertionError(material.pattern)
    colour = c1 * (1.0 - w)[:, None] + c2 * w[:, None]
    colour = colour * (1.0 + 0.04 * noise(p, params["shading"]))[:, None]
    return np.clip(colour, 0.0, 1.0)


def _paint_texture(cache: _RoomCache, materials: dict[str, Material]) -> np.ndarray:
    colours = np.empty((len(cache.texel_object), 3))
    for k, name in enumerate(cache.object_names):
        idx = np.flatnonzero(cache.texel_object == k)
        colours[idx] = _shade(materials[name], cache.texel_position[idx], cache.texel_normal[idx])
    size = cache.texture_size
    return np.rint(colours[cache.fill] * 255.0).astype(np.uint8).reshape(size, size, 3)


def _room_prompt(shares: dict[str, float], materials: dict[str, Material]) -> str:
    shown = [n for n in SHELL_ORDER if shares.get(n, 0.0) >= MIN_VISIBLE_SHARE]
    furniture = sorted((n for n in shares if n not in SHELL_ORDER and shares[n] >= MIN_VISIBLE_SHARE),
                       key=lambda n: -shares[n])
    parts = []
    for name in shown + furniture:
        phrase = materials[name].phrase()
        noun = OBJECT_NOUNS.get(name, name)
        parts.append(f"{phrase} {noun}" if noun == "walls" else f"{article(phrase)} {phrase} {noun}")
    return "a room with " + join(parts) if parts else "a room"


# ============================================================================================ panoramas
