"""Models: ``python -m backend models list|download|verify`` and ``make-tiny-model DIR``.

``models`` manages the one models folder (``--models-dir``, ``$MVDIFF_MODELS_DIR``, else the user
data folder; see ``backend/models/catalog.py``): ``list`` shows what is there and what the catalog
offers, ``download`` fetches base models (``depth``, ``base``, ``inpaint`` or a hub id) and the
released checkpoints (``pano.ckpt``, ``depth_gen.ckpt``, ...), ``verify`` loads each model found
and prints its load report. With ``--json`` the last stdout line is one JSON object; progress
goes to stderr. Failures exit non-zero with a message.

``make-tiny-model`` writes tiny random SD 2 models (``depth/``, ``base/``, ``inpaint/``) in the
layout of the SD 2 repositories, so anything that takes a model folder can be tried offline in
seconds. Their output is noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .models import catalog
from .validation import InputError


# ---------------------------------------------------------------------- make-tiny-model
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder to write depth/, base/ and inpaint/ into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")


def run(args: argparse.Namespace) -> int:
    from .models.loading import KIND_IN_CHANNELS
    from .models.tiny import write_tiny_models

    written = write_tiny_models(args.directory, seed=args.seed)
    for kind, folder in written.items():
        print(f"{kind}: {folder} (UNet in_channels {KIND_IN_CHANNELS[kind]})")
    return 0


# ---------------------------------------------------------------------- models
def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (("list", "what is in the models folder and what the catalog offers"),
                       ("download", "download base models and released checkpoints"),
                       ("verify", "load each model found and print its load report")):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("--models-dir", help=f"models folder (default: ${catalog.MODELS_DIR_ENV} or "
                         f"{catalog.models_dir()})")
        sub.add_argument("--json", action="store_true", help="print one JSON object on the last line")
        if name == "download":
            sub.add_argument("items", nargs="+", metavar="ITEM",
                             help=f"an SD 2 model kind ({', '.join(catalog.BASE_MODELS)}), a base kind with all it "
                             f"needs ({', '.join(catalog.BASE_KINDS)}), a hub id, or a "
                             f"checkpoint ({', '.join(catalog.CHECKPOINTS)})")
            sub.add_argument("--fp16", action="store_true", help="base models: the half-size fp16 weight files")
            sub.add_argument("--token", help=f"Hugging Face token (default: ${catalog.TOKEN_ENV})")
            sub.add_argument("--progress-lines", action="store_true",
                             help="progress as 'PROGRESS <fraction> <message>' lines on stdout instead of bars "
                             "(what the Blender add-on reads)")
        if name == "verify":
            sub.add_argument("--tiny", action="store_true", help="verify the tiny models built in code (offline)")


def run_models(args: argparse.Namespace) -> int:
    handlers = {"list": _list, "download": _download, "verify": _verify}
    try:
        result = handlers[args.action](args)
    except InputError as err:
        if args.json:
            print(json.dumps({"ok": False, "field": err.field, "error": err.problem}))
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable lines: stdout normally, stderr under --json so the last stdout line stays JSON."""
    print(text, file=sys.stderr if args.json else sys.stdout)


def _list(args: argparse.Namespace) -> dict[str, Any]:
    from .models import manifest

    root = catalog.models_dir(args.models_dir)
    _say(args, f"models folder: {root}")
    checkpoints = []
    for name, entry in catalog.CHECKPOINTS.items():
        path = root / name
        present = path.is_file()
        partial = path.with_name(name + ".partial")
        item = {"name": name, "task": entry.task, "kind": entry.kind, "present": present,
                "size": path.stat().st_size if present else None,
                "sha256": manifest.status(path) if present else None,
                "partial_bytes": partial.stat().st_size if partial.is_file() else None,
                "description": entry.description}
        checkpoints.append(item)
        state = f"{item['size']} bytes, sha256 {item['sha256']}" if present else "not downloaded"
        if item["partial_bytes"]:
            state += f" ({item['partial_bytes']} bytes partial: download again to resume)"
        _say(args, f"  {name:24} {state}  [{entry.description}]")
    bases = []
    for kind, ids in catalog.BASE_MODELS.items():
        for repo_id in ids:
            folder = catalog.hub_folder(repo_id, args.models_dir)
            present = (folder / "model_index.json").is_file()
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if present else None
            bases.append({"kind": kind, "id": repo_id, "default": repo_id == ids[0], "present": present,
                          "path": str(folder) if present else None, "size": size})
            mark = "*" if repo_id == ids[0] else " "
            _say(args, f" {mark}{kind:8} {repo_id:46} {f'{size} bytes' if present else 'not downloaded'}")
    return {"ok": True, "models_dir": str(root), "checkpoints": checkpoints, "base_models": bases}


def _download(args: argparse.Namespace) -> dict[str, Any]:
    from .models import manifest
    from .models.download import download

    root = catalog.models_dir(args.models_dir)
    done = []
    for index, item in enumerate(args.items):
        if args.progress_lines:
            print(f"PROGRESS {index / len(args.items):.3f} {item}: starting", flush=True)
        if item in catalog.BASE_KINDS:
            from .models.hub import download_kind

            for repo_id, folder in download_kind(item, root=root, fp16=args.fp16, token=args.token):
                done.append({"item": item, "id": repo_id, "path": str(folder)})
                _say(args, f"{item}: {repo_id} in {folder}")
            continue
        if item in catalog.BASE_MODELS or ("/" in item and not item.endswith(".ckpt")):
            from .models.hub import download_base

            repo_id, folder = download_base(item, root=root, fp16=args.fp16, token=args.token)
            done.append({"item": item, "id": repo_id, "path": str(folder)})
            _say(args, f"{item}: {repo_id} in {folder}")
            continue
        try:
            entry = catalog.checkpoint(item)
        except KeyError as err:
            kinds = ", ".join((*catalog.BASE_MODELS, *catalog.BASE_KINDS))
            raise InputError("items", f"{err.args[0]}; base models are {kinds}") from None
        path = root / entry.name
        if path.is_file():
            sha = manifest.check(path, "items")
            done.append({"item": item, "path": str(path), "sha256": sha, "downloaded": False})
            _say(args, f"{entry.name}: already in {root} (sha256 {sha} checked)")
            continue
        reporter = ProgressLines(entry.name, index, len(args.items)) if args.progress_lines else None
        result = download(entry.url, path, expected_size=entry.size, progress=reporter is None, on_progress=reporter)
        done.append({"item": item, "path": str(result.path), "sha256": result.sha256, "size": result.size,
                     "downloaded": True, "resumed": result.resumed})
        _say(args, f"{entry.name}: {result.size} bytes, sha256 {result.sha256} recorded")
    return {"ok": True, "models_dir": str(root), "downloaded": done}


class ProgressLines:
    """``PROGRESS <fraction> <message>`` lines for one file of several, at most one per half second."""

    def __init__(self, name: str, index: int, count: int):
        self.name, self.index, self.count, self.last = name, index, count, 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < 0.5 and (total is None or done < total):
            return
        self.last = now
        part = done / total if total else 0.0
        size = f"{done / 2**20:.0f} of {total / 2**20:.0f} MB" if total else f"{done / 2**20:.0f} MB"
        print(f"PROGRESS {(self.index + part) / self.count:.3f} {self.name}: {size}", flush=True)


def _verify(args: argparse.Namespace) -> dict[str, Any]:
    from .models.verify import verify_folder, verify_tiny

    reports = verify_tiny() if args.tiny else verify_folder(catalog.models_dir(args.models_dir))
    for report in reports:
        _say(args, f"{'ok  ' if report['ok'] else 'FAIL'} {report['name']}: {report['summary']}")
    if not reports:
        _say(args, "nothing to verify: the models folder holds no models; see python -m backend models list")
    return {"ok": all(r["ok"] for r in reports), "models": reports}
