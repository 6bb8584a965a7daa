"""Our own trained additions to the UNet (CAA blocks and any other added module), as safetensors.

Only the added modules are saved (:meth:`MultiViewUNet.added_state_dict`): the base UNet comes
from its own Stable Diffusion 2 source, so a file stays small and never pins a UNet copy. The
header records what the weights were trained for; a file for another task or another UNet would
otherwise load into mismatched blocks or fail deep inside ``copy_``, so both are checked first and
refused with a message naming the difference.

safetensors holds tensors and string metadata only, so loading runs no code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import write_atomically
from ..validation import InputError
from .mv_unet import MultiViewUNet

FORMAT = "mvdiff-added-weights"
FORMAT_VERSION = 1
FIELD = "weights"


@dataclass
class AddedWeightsReport:
    """What :func:`load_added_weights` loaded; ``missing`` and ``unexpected`` are empty for a strict load."""

    metadata: dict[str, str]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def header(model: MultiViewUNet) -> dict[str, str]:
    """The metadata a file of ``model``'s added weights carries."""
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "task": model.task,
        "channels": ",".join(str(c) for c in model.unet.config.block_out_channels),
        "modules": ",".join(model.added_modules()),
    }


def save_added_weights(model: MultiViewUNet, path: str | os.PathLike) -> Path:
    """Write ``model``'s added weights to ``path`` (.safetensors); the file appears only once complete."""
    path = Path(path)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.added_state_dict().items()}
    write_atomically(path, lambda partial: save_file(tensors, str(partial), metadata=header(model)))
    return path


def load_added_weights(model: MultiViewUNet, path: str | os.PathLike, strict: bool = True) -> AddedWeightsReport:
    """Load weights written by :func:`save_added_weights` into ``model``'s added modules.

    The header must name this format, a version this code reads, ``model``'s task and its UNet's
    block channels. ``strict`` also requires the file's tensors to be exactly the model's added
    tensors; without it the common ones load and the report lists the rest. A tensor of another
    shape is always refused. Nothing is written to the model when a check fails.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(FIELD, f"{path} does not exist or is not a file")
    metadata = _read_metadata(path)
    _check_header(metadata, model, path)
    if strict:
        _check_modules(metadata, model, path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # a truncated or corrupt body behind a readable header
        raise InputError(FIELD, f"{path} cannot be read: {err}") from None

    own = model.added_state_dict()
    missing = [key for key in own if key not in tensors]
    unexpected = [key for key in tensors if key not in own]
    reshaped = [
        f"{key}: file {tuple(tensors[key].shape)}, model {tuple(own[key].shape)}"
        for key in own if key in tensors and tensors[key].shape != own[key].shape
    ]
    if reshaped:
        raise InputError(FIELD, f"{path}: {len(reshaped)} tensors have another shape ({_examples(reshaped)})")
    if strict and (missing or unexpected):
        parts = [f"{len(keys)} {label} ({_examples(keys)})" for label, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputError(FIELD, f"{path} does not match the model's added modules: {'; '.join(parts)}")
    loaded = [key for key in own if key in tensors]
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(tensors[key])
    return AddedWeightsReport(metadata, loaded, missing, unexpected)


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # not safetensors at all: a .ckpt, an HTML error page, ...
        raise InputError(
            FIELD,
            f"{path} cannot be read as safetensors ({err}); released MVDiffusion .ckpt files load with "
            "load_released_checkpoint",
        ) from None
    if metadata.get("format") != FORMAT:
        raise InputError(FIELD, f"{path} is not a file of MVDiffusion added weights (no '{FORMAT}' header)")
    return dict(metadata)


def _check_header(metadata: dict[str, str], model: MultiViewUNet, path: Path) -> None:
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise InputError(FIELD, f"{path} has an unreadable format version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise InputError(
            FIELD, f"{path} has format version {version}; this backend reads up to {FORMAT_VERSION}, update it"
        )
    if metadata.get("task") != model.task:
        raise InputError(
            FIELD, f"{path} holds {metadata.get('task')} weights, but the model is a {model.task} MultiViewUNet"
        )
    want = header(model)["channels"]
    if metadata.get("channels") != want:
        raise InputError(
            FIELD,
            f"{path} was trained on a UNet with block channels ({metadata.get('channels')}), "
            f"but this UNet has ({want})",
        )


def _check_modules(metadata: dict[str, str], model: MultiViewUNet, path: Path) -> None:
    """Name a whole module present on one side only (the condition branch, typically) rather than its tensors."""
    held = {name for name in metadata.get("modules", "").split(",") if name}
    have = set(model.added_modules())
    if held == have:
        return
    parts = []
    if held - have:
        parts.append(f"the file has weights for {', '.join(sorted(held - have))}, which the model lacks")
    if have - held:
        parts.append(f"the model's {', '.join(sorted(have - held))} has no weights in the file")
    hint = ""
    if "condition" in held - have:
        hint = " (build the MultiViewUNet with with_condition=True)"
    raise InputError(FIELD, f"{path}: {'; '.join(parts)}{hint}; pass strict=False to load the common modules")


def _examples(items: list[str], count: int = 5) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")
