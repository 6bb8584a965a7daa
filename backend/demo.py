"""The offline demo: everything the project can do end to end without model weights.

Builds the demo room, renders views of its ground-truth texture along a camera loop, bakes
them back into a UV atlas, and writes the texture, a contact sheet and a report under ``out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .geometry.mesh import Mesh


def contact_sheet(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Tile equally sized uint8 images into a grid with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    sheet = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            sheet[top : top + height, left : left + width] = image
    return sheet


def write_obj(path: Path, mesh: Mesh) -> None:
    """Wavefront OBJ with per-corner UVs, so the result opens in Blender or any viewer."""
    lines = [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in mesh.vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uvs.reshape(-1, 2)]
    lines.append("usemtl baked")
    for t, (a, b, c) in enumerate(mesh.triangles + 1):
        k = 3 * t + 1
        lines.append(f"f {a}/{k} {b}/{k + 1} {c}/{k + 2}")
    path.write_text("mtllib demo_room.mtl\n" + "\n".join(lines) + "\n")
    path.with_suffix(".mtl").write_text("newmtl baked\nKd 1 1 1\nmap_Kd demo_texture.png\n")


def run(args: argparse.Namespace) -> int:
    from .eval.bake_roundtrip import bake_roundtrip  # torch: imported by the command, not by its --help
    from .geometry.render import render_textured

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Baking the demo room ({args.views} views, {args.size}x{args.size} texture)...", flush=True)
    trip = bake_roundtrip(args.size, args.views, args.heldout)
    texture = trip.result.texture_uint8()
    iio.imwrite(out / "demo_texture.png", texture)
    iio.imwrite(out / "ground_truth_texture.png", trip.room.texture)
    iio.imwrite(out / "seen_mask.png", (trip.result.seen * 255).astype(np.uint8))
    write_obj(out / "demo_room.obj", trip.room.atlas.mesh)

    shown = trip.heldout[: min(6, len(trip.heldout))]
    rebaked = [render_textured(trip.room.atlas.mesh, texture, view.camera).image for view in shown]
    step = max(1, len(trip.views) // len(shown))
    sheet = contact_sheet([[v.image for v in trip.views[::step][: len(shown)]], [v.image for v in shown], rebaked])
    iio.imwrite(out / "contact_sheet.png", sheet)

    report = {
        "psnr_db_heldout": round(trip.psnr_db, 3),
        "coverage": round(trip.coverage, 5),
        "views": len(trip.views),
        "heldout_views": len(trip.heldout),
        "texture_size": args.size,
        "seconds": {k: round(v, 3) for k, v in trip.seconds.items()},
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"Held-out PSNR {trip.psnr_db:.2f} dB, coverage {trip.coverage:.4f}, bake {trip.seconds['bake']:.2f} s")
    print("Contact sheet rows: baking views | held-out ground truth | held-out views of the baked texture")
    print(f"Results in {out}: demo_texture.png, contact_sheet.png, demo_room.obj, demo_report.json")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out", help="output folder (created if missing)")
    parser.add_argument("--size", type=int, default=1024, help="texture size")
    parser.add_argument("--views", type=int, default=24, help="views rendered along the camera loop")
    parser.add_argument("--heldout", type=int, default=8, help="held-out poses to score the texture")
