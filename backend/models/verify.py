"""``models verify``: load each model and report what went where, so a bad file shows before a job.

Each report is a dict: ``name``, ``ok``, ``summary`` and, for multi-view weights, the key counts
``placed`` / ``skipped`` / ``missing`` / ``unexpected`` (:func:`~.released.load_released_checkpoint`
and :func:`~.weights.load_added_weights` reports).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..validation import InputError
from . import catalog, manifest


def verify_tiny() -> list[dict[str, Any]]:
    """The tiny models built in code: each task's added weights saved and loaded back strictly."""
    from .tiny import tiny_multiview
    from .weights import load_added_weights, save_added_weights

    reports = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("depth", "base"):
            model = tiny_multiview(kind)
            path = save_added_weights(model, Path(folder) / f"{kind}.safetensors")
            fresh = tiny_multiview(kind, seed=1)
            loaded = load_added_weights(fresh, path)
            reports.append(_report(f"tiny {model.task}", len(loaded.loaded), {}, loaded.missing, loaded.unexpected))
    return reports


def verify_folder(root: Path) -> list[dict[str, Any]]:
    """Every base model and released checkpoint in the models folder; a failure is reported, not raised."""
    from .loading import load_components

    reports = []
    for kind in catalog.BASE_MODELS:
        folder = catalog.local_base_model(kind, root)
        if folder is None:
            continue
        try:
            parts = load_components(folder, kind, offline=True)
            count = len(parts.unet.state_dict())
            reports.append({"name": folder.name, "ok": True, "summary": f"{kind}: UNet with {count} tensors loaded"})
        except InputError as err:
            reports.append({"name": folder.name, "ok": False, "summary": str(err)})
    for name, entry in catalog.CHECKPOINTS.items():
        path = root / name
        if path.is_file():
            reports.append(_verify_checkpoint(path, entry, root))
    return reports


def _verify_checkpoint(path: Path, entry: catalog.Checkpoint, root: Path) -> dict[str, Any]:
    from .loading import load_components
    from .mv_unet import MultiViewUNet
    from .released import load_released_checkpoint

    try:
        sha = manifest.check(path)
        if entry.task not in ("depth", "panorama"):
            return {"name": path.name, "ok": True, "summary": f"sha256 {sha} checked (no multi-view blocks)"}
        base = catalog.local_base_model(entry.kind, root) or catalog.default_base_model(entry.kind)
        unet = load_components(base, entry.kind, offline=True).unet
        model = MultiViewUNet(unet, entry.task, with_condition=entry.task == "depth")
        report = load_released_checkpoint(model, path, allow_partial=True)
    except InputError as err:
        return {"name": path.name, "ok": False, "summary": str(err)}
    missing = report.missing + [f"{a} -> {b}" for a, b, _, _ in report.shape_mismatches]
    return _report(path.name, len(report.loaded), report.skipped, missing, report.unexpected)


def _report(name: str, placed: int, skipped: dict[str, list[str]], missing: list[str],
            unexpected: list[str]) -> dict[str, Any]:
    skipped_count = sum(len(keys) for keys in skipped.values())
    summary = f"{placed} keys placed, {skipped_count} skipped, {len(missing)} missing, {len(unexpected)} unexpected"
    return {"name": name, "ok": not (missing or unexpected), "summary": summary, "placed": placed,
            "skipped": skipped_count, "missing": len(missing), "unexpected": len(unexpected)}
