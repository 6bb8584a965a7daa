"""What the procedural data sets share: split codes, named colours, smooth noise, prompt grammar."""

from __future__ import annotations

import math

import numpy as np

SPLITS = {"train": 0, "heldout": 1}

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.78, 0.13, 0.12),
    "orange": (0.92, 0.50, 0.12),
    "yellow": (0.93, 0.82, 0.20),
    "green": (0.20, 0.58, 0.24),
    "teal": (0.08, 0.52, 0.52),
    "blue": (0.14, 0.30, 0.76),
    "purple": (0.48, 0.22, 0.62),
    "pink": (0.93, 0.56, 0.70),
    "brown": (0.48, 0.30, 0.15),
    "beige": (0.86, 0.78, 0.62),
    "white": (0.93, 0.93, 0.91),
    "grey": (0.50, 0.50, 0.50),
    "black": (0.10, 0.10, 0.11),
}


def draw_waves(rng: np.random.Generator, count: int, wavelengths: tuple[float, float]) -> tuple:
    normals = rng.normal(size=(count, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    frequency = 2 * math.pi / rng.uniform(*wavelengths, size=count)
    return normals, frequency, rng.uniform(0, 2 * math.pi, size=count)

def noise(p: np.ndarray, waves: tuple) -> np.ndarray:
    """Sum of plane waves, about unit standard deviation; a smooth function of 3D position."""
    normals, frequency, phase = waves
    return np.cos((p @ normals.T) * frequency + phase).sum(axis=1) * math.sqrt(2.0 / len(frequency))

def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)

def luminance(rgb: np.ndarray) -> float:
    return float(0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2])


def article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]
