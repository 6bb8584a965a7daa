"""Load the Stable Diffusion 2 components MVDiffusion builds on, from wherever the user keeps them.

``load_components(source, kind)`` accepts three kinds of ``source``:

* a local diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``), as written by ``save_pretrained``, ``python -m backend models
  download``, ``hf download`` or ``python -m backend make-tiny-model``;
* a Hugging Face model id such as ``sd2-community/stable-diffusion-2-depth``. Offline (the default
  when ``HF_HUB_OFFLINE`` is set) only the local Hugging Face cache is consulted, so a missing
  model fails at once instead of after the hub client's retries;
* a single checkpoint file in the original Stable Diffusion (LDM) layout, ``.safetensors`` or
  ``.ckpt``. Such a file holds weights only. The architecture configs, the tokenizer files and the
  scheduler config come from ``config``: a local diffusers folder of the matching SD 2 model (its
  weights are not read, so the JSON and tokenizer files alone are enough) or a hub id. Without
  ``config`` the catalog's SD 2 repository for ``kind`` is used (:mod:`.catalog`), which offline works only if its
  configs are already in the Hugging Face cache.

``kind`` names the task and with it the UNet the task needs: ``base`` (SD 2 base, 4 input
channels: text to panorama), ``depth`` (SD 2 depth, 5: latent + depth) or ``inpaint`` (SD 2
inpainting, 9: latent + mask + masked image). Every failure the user can fix raises
``InputError`` naming ``source``, ``config`` or ``kind``.

Checkpoint files are read without running pickled code: ``.safetensors`` holds tensors only,
and ``.ckpt`` is opened with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers and refuses any other object. diffusers' own ``from_single_file`` reads files the same
way; reading the file here first lets the kind be checked before any model is built and lets one
read serve all components.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..sampling_options import DEFAULT_SCHEDULER
from ..validation import InputError
from .catalog import DOWNLOAD_HINT, default_base_model, hub_offline
from .schedulers import build_scheduler, scheduler_class

KIND_IN_CHANNELS = {"depth": 5, "base": 4, "inpaint": 9}
"""UNet input channels per task: latent (4) + depth (1); latent only; latent + mask (1) + masked image (4)."""

MODEL_NAMES = {4: "SD 2 base", 5: "SD 2 depth", 9: "SD 2 inpainting"}
TASK_NAMES = {"depth": "the depth task", "base": "the panorama task", "inpaint": "panorama outpainting"}
HUB_IDS = {kind: default_base_model(kind) for kind in KIND_IN_CHANNELS}
"""The SD 2 model each task starts from (the catalog's default); also the default single-file config."""

CHECKPOINT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth"}
LDM_UNET = "model.diffusion_model."
LDM_VAE_PARTS = tuple(f"first_stage_model.{part}." for part in ("encoder", "decoder", "quant_conv", "post_quant_conv"))
LDM_OPEN_CLIP = "cond_stage_model.model."
LDM_CLIP_SD1 = "cond_stage_model.transformer."
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Components:
    """The parts of an SD 2 pipeline MVDiffusion uses.

    ``scheduler`` carries the source's training schedule, in the default scheduler's class; jobs
    build the scheduler they ask for from its config (``backend/models/schedulers.py``).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    kind: str
    source: str



@contextmanager
def quiet_hub_deprecations():
    """diffusers' config lookup for hub ids passes an argument huggingface_hub has deprecated: nothing
    a user can act on, so its warning is not shown while a model loads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
        yield

def load_components(
    source: str | os.PathLike,
    kind: str,
    *,
    offline: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | os.PathLike | None = None,
) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and the noise schedule for ``kind`` from ``source``.

    ``offline`` defaults to whether ``HF_HUB_OFFLINE`` is set; it only matters for hub ids (as
    ``source`` or ``config``). ``config`` is used only when ``source`` is a checkpoint file.
    """
    if kind not in KIND_IN_CHANNELS:
        raise InputError("kind", f"must be one of {sorted(KIND_IN_CHANNELS)}, got {kind!r}")
    if offline is None:
        offline = hub_offline()
    where, ref = locate("source", source)
    with quiet_hub_deprecations():
        if where == "file":
            parts = _from_single_file(Path(ref), kind, config, offline, dtype)
        else:
            parts = _from_pretrained("source", ref, kind, offline or where == "folder", dtype)
    unet, vae, text_encoder, tokenizer, scheduler = parts
    return Components(
        unet=unet.to(device),
        vae=vae.to(device),
        text_encoder=text_encoder.to(device=device, dtype=dtype),
        tokenizer=tokenizer,
        scheduler=scheduler,
        kind=kind,
        source=str(source),
    )


def check_kind(field: str, in_channels: int, kind: str) -> None:
    """Reject a UNet whose input channels are not the ones ``kind`` needs, saying what it is instead."""
    want = KIND_IN_CHANNELS[kind]
    if in_channels == want:
        return
    needed = f"{TASK_NAMES[kind]} needs {MODEL_NAMES[want]} (UNet in_channels {want}), e.g. {HUB_IDS[kind]}"
    if in_channels in MODEL_NAMES:
        have = f"this is an {MODEL_NAMES[in_channels]} model (UNet in_channels {in_channels})"
    else:
        have = f"this UNet takes {in_channels} input channels, which matches no SD 2 base, depth or inpainting model"
    raise InputError(field, f"{have}; {needed}")


def locate(field: str, value: str | os.PathLike) -> tuple[str, str]:
    """Classify ``value`` as ("folder", path), ("file", path) or ("hub", model id)."""
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise InputError(field, f"{path} is a file but not a checkpoint (expected .safetensors or .ckpt)")
        return "file", str(path)
    looks_like_path = (
        not isinstance(value, str)
        or path.is_absolute()
        or text.startswith((".", "~"))
        or "\\" in text
        or path.suffix.lower() in CHECKPOINT_SUFFIXES
        or not _HUB_ID.fullmatch(text)
    )
    if looks_like_path:
        raise InputError(
            field,
            f"{text!r} does not exist; give a diffusers model folder, a .safetensors/.ckpt file, "
            f"or a Hugging Face model id such as {HUB_IDS['depth']}",
        )
    return "hub", text


def _hub_failure(field: str, ref: str, local_only: bool, err: Exception) -> InputError:
    if local_only:
        return InputError(
            field,
            f"{ref!r} is not a local path and is not in the Hugging Face cache, and hub downloads are off "
            "(HF_HUB_OFFLINE is set or offline=True). Download it once with network access: "
            + DOWNLOAD_HINT.format(what=_download_name(ref), repo=ref)
            + "; or pass a local diffusers folder",
        )
    return InputError(field, f"could not load {ref!r} from the Hugging Face Hub: {_first_line(err)}")


def _download_name(ref: str) -> str:
    """What to give ``models download`` for ``ref``: its kind when it is a catalog id, else the id."""
    from .catalog import BASE_KINDS, BASE_MODELS

    families = {kind: family.models + family.controlnets for kind, family in BASE_KINDS.items()
                if not family.multiview_weights}
    return next((kind for kind, ids in {**BASE_MODELS, **families}.items() if ref in ids), ref)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_pretrained(field: str, ref: str, kind: str, local_only: bool, dtype: torch.dtype):
    """Diffusers layout, local or hub: read the UNet config first so a wrong kind fails before any weights load."""
    is_hub = not Path(ref).is_dir()
    try:
        unet_config = UNet2DConditionModel.load_config(ref, subfolder="unet", local_files_only=local_only)
    except (OSError, ValueError) as err:
        if is_hub:
            raise _hub_failure(field, ref, local_only, err) from None
        raise InputError(
            field,
            f"{ref} is not a diffusers model folder (no readable unet/config.json); expected model_index.json "
            "with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ subfolders",
        ) from None
    check_kind(field, int(unet_config["in_channels"]), kind)
    # A folder downloaded with ``models download --fp16`` holds only the fp16 variant files.
    only_fp16 = not is_hub and not (Path(ref) / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (
        Path(ref) / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    variant = {"variant": "fp16"} if only_fp16 else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            ref, subfolder="unet", torch_dtype=dtype, local_files_only=local_only, **variant
        )
        vae = AutoencoderKL.from_pretrained(
            ref, subfolder="vae", torch_dtype=dtype, local_files_only=local_only, **variant
        )
        text_encoder = CLIPTextModel.from_pretrained(
            ref, subfolder="text_encoder", local_files_only=local_only, **variant
        )
        tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", local_files_only=local_only)
        scheduler = _scheduler(ref, local_only)
    except (OSError, ValueError) as err:
        if is_hub:
            raise _hub_failure(field, ref, local_only, err) from None
        raise InputError(field, f"{ref}: incomplete diffusers model folder: {_first_line(err)}") from None
    return unet, vae, text_encoder.eval(), tokenizer, scheduler


def _scheduler(ref: str, local_only: bool) -> SchedulerMixin:
    """The source's schedule, whatever class its config names, as the default scheduler."""
    raw = scheduler_class(DEFAULT_SCHEDULER).load_config(ref, subfolder="scheduler", local_files_only=local_only)
    return build_scheduler(DEFAULT_SCHEDULER, raw)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt file, never unpickling anything but tensors and plain containers."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # Memory-mapping needs the zip container every torch.save since 1.6 writes; older files load in full.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise InputError(
            "source",
            f"{path} holds pickled Python objects besides tensors, which are not loaded because unpickling can run "
            f"arbitrary code ({_first_line(err)}). Convert it to .safetensors with a tool you trust",
        ) from None
    except Exception as err:  # truncated downloads, HTML error pages saved as .ckpt, wrong formats
        raise InputError("source", f"{path} cannot be read as a checkpoint: {_first_line(err)}") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError("source", f"{path} holds a {type(state).__name__}, not a dictionary of tensors")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _single_file_layout(path: Path, state: dict[str, torch.Tensor]) -> int:
    """Check the file is an SD 2 checkpoint in the LDM layout; return its UNet input channels."""
    if any(key.startswith("mv_base_model.") for key in state):
        raise InputError(
            "source",
            f"{path} is an MVDiffusion checkpoint (mv_base_model.* keys), not a Stable Diffusion one; give the SD 2 "
            "model it was trained from as source and load the MVDiffusion weights into the multi-view UNet",
        )
    conv_in = state.get(LDM_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise InputError(
            "source",
            f"{path} is not a Stable Diffusion checkpoint in the original layout (no {LDM_UNET}* weights); "
            "for a diffusers model pass its folder instead",
        )
    if not any(key.startswith(LDM_VAE_PARTS) for key in state):
        raise InputError("source", f"{path} holds no VAE weights (first_stage_model.*)")
    if not any(key.startswith(LDM_OPEN_CLIP) for key in state):
        if any(key.startswith(LDM_CLIP_SD1) for key in state):
            raise InputError("source", f"{path} is an SD 1.x checkpoint (CLIP ViT-L); MVDiffusion builds on SD 2")
        raise InputError("source", f"{path} holds no OpenCLIP text encoder weights ({LDM_OPEN_CLIP}*)")
    return int(conv_in.shape[1])


def _from_single_file(path: Path, kind: str, config, offline: bool, dtype: torch.dtype):
    state = read_checkpoint(path)
    check_kind("source", _single_file_layout(path, state), kind)
    if config is None:
        where, ref = "hub", HUB_IDS[kind]
    else:
        where, ref = locate("config", config)
        if where == "file":
            raise InputError("config", f"{ref} is a file; config must be a diffusers model folder or a hub id")
    local_only = offline or where == "folder"
    try:
        unet_config = UNet2DConditionModel.load_config(ref, subfolder="unet", local_files_only=local_only)
        tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", local_files_only=local_only)
        scheduler = _scheduler(ref, local_only)
        text_config = CLIPTextConfig.from_pretrained(ref, subfolder="text_encoder", local_files_only=local_only)
    except (OSError, ValueError) as err:
        if where == "hub" and config is None:
            reason = (
                "is not in the Hugging Face cache and hub downloads are off"
                if local_only
                else f"could not be fetched ({_first_line(err)})"
            )
            raise InputError(
                "config",
                f"a single checkpoint file holds weights only; its configs and tokenizer come from {ref}, which "
                f"{reason}. Pass config=<local diffusers folder of {ref}> (its JSON and tokenizer files are enough; "
                f"hf download {ref} --include '*.json' '*.txt' fetches just those; "
                f"python -m backend models download {_download_name(ref)} fetches the whole model)",
            ) from None
        if where == "hub":
            raise _hub_failure("config", ref, local_only, err) from None
        raise InputError(
            "config", f"{ref} lacks the unet, text_encoder, tokenizer or scheduler config: {_first_line(err)}"
        ) from None
    if int(unet_config["in_channels"]) != KIND_IN_CHANNELS[kind]:
        raise InputError(
            "config",
            f"{ref} describes a UNet with in_channels {unet_config['in_channels']}, but the checkpoint "
            f"and kind {kind!r} need {KIND_IN_CHANNELS[kind]}; use the config folder of {HUB_IDS[kind]}",
        )
    unet = _single_file_model(UNet2DConditionModel, path, state, ref, "unet", local_only, dtype)
    _expect_all(path, "UNet", sum(key.startswith(LDM_UNET) for key in state), unet)
    vae = _single_file_model(AutoencoderKL, path, state, ref, "vae", local_only, dtype)
    _expect_all(path, "VAE", sum(key.startswith(LDM_VAE_PARTS) for key in state), vae)
    text_encoder = _open_clip_text_encoder(path, state, text_config)
    return unet, vae, text_encoder, tokenizer, scheduler


def _single_file_model(cls, path: Path, state, ref: str, subfolder: str, local_only: bool, dtype: torch.dtype):
    """diffusers' converter for one component; the config comes from ``ref`` so nothing is inferred or fetched."""
    # float32 is what the models are built in; passing it anyway makes diffusers log a spurious cast warning.
    cast = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        return cls.from_single_file(state, config=ref, subfolder=subfolder, local_files_only=local_only, **cast)
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(
            "source", f"{path}: the {subfolder} weights do not fit the config from {ref}: {_first_line(err)}"
        ) from None


def _expect_all(path: Path, name: str, found: int, model: torch.nn.Module) -> None:
    """diffusers loads single files with ``strict=False``; the LDM-to-diffusers renaming is one to one, so a
    count mismatch means weights were left at their random initial values."""
    expected = len(model.state_dict())
    if found != expected:
        raise InputError("source", f"{path} holds {found} {name} tensors where the config's {name} has {expected}")


def _open_clip_text_encoder(path: Path, state, text_config: CLIPTextConfig) -> CLIPTextModel:
    """SD 2's OpenCLIP text tower as a transformers CLIPTextModel, loaded strictly.

    diffusers converts the weights (splitting the fused q/k/v projection) but has no public loader
    for a lone text encoder, and its pipeline-level one loads with ``strict=False``.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model = CLIPTextModel(text_config)
    converted = convert_open_clip_checkpoint(model, state, prefix=LDM_OPEN_CLIP)
    own = model.state_dict()
    if not any(key.startswith("text_model.") for key in own):
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    missing = sorted(set(own) - set(converted) - {key for key in own if key.endswith("position_ids")})
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise InputError(
            "source",
            f"{path}: the text encoder weights do not fit the config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {example})",
        )
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as err:
        raise InputError("source", f"{path}: text encoder weights do not fit the config: {_first_line(err)}") from None
    return model.eval()
