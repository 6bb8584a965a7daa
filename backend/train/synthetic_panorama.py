"""Procedural 360 landscapes cut into the panorama layout, for training the panorama model.

Sky gradient, clouds, sun or moon, mountains, ground, coloured towers and balloons are drawn as
functions of direction into an equirect, then cut into the project's panorama views with its own
equirect sampler; each view's prompt says what it shows. Deterministic per ``(seed, split, index)``.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry.cameras import Camera
from ..geometry.equirect import equirect_directions, equirect_to_perspective, nearest_equirect_pixel
from ..geometry.panorama import panorama_layout
from ..validation import InputError, positive_int
from .samples import MultiViewSample, sample_index
from .synthetic_common import PALETTE, SPLITS, article, draw_waves, join, noise, smoothstep

SKIES = {  # name: (horizon colour, zenith colour)
    "blue": ((0.72, 0.84, 0.96), (0.12, 0.32, 0.74)),
    "sunset": ((0.98, 0.58, 0.28), (0.32, 0.18, 0.48)),
    "grey overcast": ((0.80, 0.80, 0.82), (0.52, 0.54, 0.58)),
    "night": ((0.12, 0.14, 0.28), (0.01, 0.02, 0.08)),
    "pink dawn": ((0.98, 0.74, 0.74), (0.42, 0.52, 0.80)),
}
GROUNDS = {  # prompt phrase: colour
    "green grass": (0.24, 0.50, 0.18),
    "a sandy desert": (0.86, 0.72, 0.44),
    "a blue sea": (0.08, 0.28, 0.52),
    "white snow": (0.92, 0.93, 0.95),
    "brown dirt": (0.44, 0.30, 0.18),
}
MOUNTAIN_COLOURS = ("purple", "grey", "green", "blue", "brown")
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "white", "black")
SHAPE_KINDS = ("tower", "balloon")
PANORAMA_MIN_SHARE = 0.005  # low enough for a sun or balloon that a view shows whole


class SyntheticPanoramaData:
    """``count`` procedural panoramas cut into :func:`panorama_layout` views of ``view_size`` pixels.

    The landscape is a function of direction in the project's world (Z up), rendered to an
    equirect of ``equirect_height`` rows (default ``2 * view_size``, finer than the views) in
    Cycles' convention, then sampled into the layout's views (8 ring views, plus the two pole
    views unless ``pole_views`` is False) with :func:`equirect_to_perspective`. ``meta`` holds
    the equirect (uint8), the recipe and, per view, the share of each component it shows; every
    view's prompt names the components covering at least 2 % of it, e.g. "a sunset sky with
    clouds, purple mountains, a sandy desert and a red tower".
    """

    def __init__(
        self,
        count: int,
        view_size: int = 64,
        seed: int = 0,
        split: str = "train",
        *,
        pole_views: bool = True,
        equirect_height: int | None = None,
    ) -> None:
        self.count = positive_int("count", count)
        self.view_size = positive_int("view_size", view_size)
        if split not in SPLITS:
            raise InputError("split", f"must be one of {tuple(SPLITS)}, got {split!r}")
        self.split = split
        self.seed = int(seed)
        self.pole_views = bool(pole_views)
        self.equirect_height = 2 * self.view_size if equirect_height is None else positive_int(
            "equirect_height", equirect_height)
        self.cameras = panorama_layout(self.view_size, pole_views=self.pole_views)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> MultiViewSample:
        index = sample_index(index, self.count)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))
        recipe = _draw_landscape(rng)
        height = self.equirect_height
        dirs = equirect_directions(height, 2 * height)
        colour, label = _landscape(dirs, recipe, edge=math.pi / height)
        equirect = np.rint(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8)
        names = recipe["labels"]
        images, prompts, visible = [], [], []
        for camera in self.cameras:
            images.append(equirect_to_perspective(equirect, camera))
            shares = _view_label_shares(camera, label, len(names))
            shown = {names[k]: float(s) for k, s in enumerate(shares) if s > 0}
            visible.append(shown)
            prompts.append(_landscape_prompt(shown, recipe))
        return MultiViewSample(
            task="panorama",
            images=np.stack(images),
            cameras=list(self.cameras),
            depths=None,
            prompts=prompts,
            keyframes=None,
            meta={
                "dataset": "synthetic-panorama",
                "split": self.split,
                "seed": self.seed,
                "index": index,
                "equirect": equirect,
                "recipe": {k: v for k, v in recipe.items() if k not in ("clouds_waves", "ground_waves")},
                "visible": visible,
            },
        )


def _draw_landscape(rng: np.random.Generator) -> dict:
    sky = str(rng.choice(list(SKIES)))
    recipe: dict = {
        "sky": sky,
        "clouds": bool(rng.random() < 0.5) and sky != "night",
        "clouds_waves": draw_waves(rng, 5, (0.4, 1.2)),
        "ground": str(rng.choice(list(GROUNDS))),
        "ground_waves": draw_waves(rng, 4, (0.1, 0.4)),
        "horizon_deg": float(rng.uniform(-8.0, 2.0)),
    }
    if rng.random() < 0.6:
        recipe["sun"] = {
            "kind": "moon" if sky == "night" else "sun",
            "azimuth": float(rng.uniform(-math.pi, math.pi)),
            "elevation": math.radians(rng.uniform(12.0, 50.0)),
            "radius": math.radians(rng.uniform(4.0, 8.0)),
        }
    if rng.random() < 0.6:
        recipe["mountains"] = {
            "colour": str(rng.choice(MOUNTAIN_COLOURS)),
            "base_deg": float(rng.uniform(4.0, 10.0)),
            "amplitudes_deg": rng.uniform(0.0, 4.0, size=4),
            "phases": rng.uniform(0, 2 * math.pi, size=4),
        }
    shapes = []
    for _ in range(int(rng.integers(0, 4))):
        kind = str(rng.choice(SHAPE_KINDS))
        shape = {"kind": kind, "colour": str(rng.choice(SHAPE_COLOURS)),
                 "azimuth": float(rng.uniform(-math.pi, math.pi))}
        if kind == "tower":
            shape["half_width"] = math.radians(rng.uniform(3.0, 7.0))
            shape["top"] = math.radians(rng.uniform(12.0, 35.0))
        else:
            shape["elevation"] = math.radians(rng.uniform(15.0, 50.0))
            shape["radius"] = math.radians(rng.uniform(4.0, 8.0))
        shapes.append(shape)
    recipe["shapes"] = shapes
    labels = ["sky", "ground"]
    if "sun" in recipe:
        labels.append("sun")
    if "mountains" in recipe:
        labels.append("mountains")
    labels += [f"shape{k}" for k in range(len(shapes))]
    recipe["labels"] = labels
    return recipe


def _landscape(dirs: np.ndarray, recipe: dict, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour (H, W, 3) in [0, 1] and the label (index into ``recipe['labels']``) that owns each pixel."""
    labels = recipe["labels"]
    x, y, z = dirs[..., 0], dirs[..., 1], dirs[..., 2]
    elevation = np.arcsin(np.clip(z, -1.0, 1.0))
    azimuth = np.arctan2(y, x)
    horizon = math.radians(recipe["horizon_deg"])
    low, high = (np.array(c) for c in SKIES[recipe["sky"]])
    t = np.sqrt(np.clip((elevation - horizon) / (math.pi / 2 - horizon), 0.0, 1.0))[..., None]
    colour = low * (1.0 - t) + high * t
    label = np.zeros(dirs.shape[:-1], np.int64)
    if recipe["clouds"]:
        amount = smoothstep(0.3, 1.2, noise(dirs.reshape(-1, 3), recipe["clouds_waves"]).reshape(z.shape))
        amount *= smoothstep(horizon, horizon + 0.15, elevation)
        colour = colour * (1.0 - 0.8 * amount[..., None]) + 0.8 * amount[..., None] * np.array([0.95, 0.95, 0.97])
    if "sun" in recipe:
        sun = recipe["sun"]
        centre = _unit(sun["azimuth"], sun["elevation"])
        angle = np.arccos(np.clip(dirs @ centre, -1.0, 1.0))
        disc = 1.0 - smoothstep(sun["radius"] - edge, sun["radius"] + edge, angle)
        glow = 0.35 * np.exp(-(angle / (3.0 * sun["radius"])) ** 2) * (1.0 - disc)
        tint = np.array([1.0, 0.95, 0.75]) if sun["kind"] == "sun" else np.array([0.9, 0.9, 0.85])
        colour = colour * (1.0 - disc - glow)[..., None] + tint * (disc + glow)[..., None]
        label[disc > 0.5] = labels.index("sun")
    if "mountains" in recipe:
        m = recipe["mountains"]
        ridge = math.radians(m["base_deg"]) + sum(
            math.radians(a) * np.sin((k + 2) * azimuth + p)
            for k, (a, p) in enumerate(zip(m["amplitudes_deg"], m["phases"], strict=True)))
        ridge = np.maximum(ridge, horizon + math.radians(1.0))
        inside = 1.0 - smoothstep(-edge, edge, elevation - ridge)
        shade = 0.8 + 0.2 * (elevation - horizon) / np.maximum(ridge - horizon, 1e-6)
        tone = np.array(PALETTE[m["colour"]]) * 0.7 + 0.3 * low
        colour = colour * (1.0 - inside[..., None]) + (tone * np.clip(shade, 0.6, 1.0)[..., None]) * inside[..., None]
        label[inside > 0.5] = labels.index("mountains")
    for k, shape in enumerate(recipe["shapes"]):
        rgb = np.array(PALETTE[shape["colour"]])
        if shape["kind"] == "tower":
            offset = np.abs(np.angle(np.exp(1j * (azimuth - shape["azimuth"]))))
            across = 1.0 - smoothstep(shape["half_width"] - edge, shape["half_width"] + edge, offset)
            up = 1.0 - smoothstep(shape["top"] - edge, shape["top"] + edge, elevation)
            inside = across * up
        else:
            centre = _unit(shape["azimuth"], shape["elevation"])
            angle = np.arccos(np.clip(dirs @ centre, -1.0, 1.0))
            inside = 1.0 - smoothstep(shape["radius"] - edge, shape["radius"] + edge, angle)
        colour = colour * (1.0 - inside[..., None]) + rgb * inside[..., None]
        label[inside > 0.5] = labels.index(f"shape{k}")
    ground = np.array(GROUNDS[recipe["ground"]])
    below = 1.0 - smoothstep(horizon - edge, horizon + edge, elevation)
    texture = 1.0 + 0.08 * noise(dirs.reshape(-1, 3), recipe["ground_waves"]).reshape(z.shape)
    depth_shade = 0.75 + 0.25 * np.clip(1.0 + (elevation - horizon) / (math.pi / 2), 0.0, 1.0)
    ground_colour = ground * (texture * depth_shade)[..., None]
    colour = colour * (1.0 - below[..., None]) + ground_colour * below[..., None]
    label[below > 0.5] = labels.index("ground")
    return np.clip(colour, 0.0, 1.0), label


def _unit(azimuth: float, elevation: float) -> np.ndarray:
    return np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                     math.sin(elevation)])


def _view_label_shares(camera: Camera, label: np.ndarray, count: int) -> np.ndarray:
    """Share of the camera's pixels owned by each label (nearest equirect pixel of each pixel's ray)."""
    height, width = label.shape
    dirs = camera.ray_directions().reshape(-1, 3)
    rows, cols = nearest_equirect_pixel(dirs, height, width)
    shares = np.bincount(label[rows, cols], minlength=count) / len(dirs)
    return np.where(shares >= PANORAMA_MIN_SHARE, shares, 0.0)


def _landscape_prompt(shown: dict[str, float], recipe: dict) -> str:
    parts = []
    if "sky" in shown:
        clouds = " with clouds" if recipe["clouds"] else ""
        parts.append(f"{article(recipe['sky'])} {recipe['sky']} sky{clouds}")
    if "sun" in shown:
        parts.append("a bright sun" if recipe["sun"]["kind"] == "sun" else "a full moon")
    if "mountains" in shown:
        parts.append(f"{recipe['mountains']['colour']} mountains")
    if "ground" in shown:
        parts.append(recipe["ground"])
    for k, shape in enumerate(recipe["shapes"]):
        if f"shape{k}" in shown:
            parts.append(f"{article(shape['colour'])} {shape['colour']} {shape['kind']}")
    return "a landscape with " + join(parts) if parts else "a landscape"
