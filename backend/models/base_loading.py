"""Load an SD 1.5 or SDXL base model and its depth ControlNet, from wherever the user keeps them.

``load_controlnet_base(kind, source, controlnet)`` accepts for ``source`` what
:func:`~backend.models.loading.load_components` accepts for SD 2: a local diffusers folder, a
Hugging Face model id, or a single checkpoint file in the original layout (a user's fine-tuned
model, ``.safetensors`` or ``.ckpt``, read without unpickling anything but tensors). A single
file holds weights only; the configs and tokenizers come from ``config`` (a diffusers folder or a
hub id of the same family), by default the catalog's model of the kind. ``controlnet`` is a hub
id or a diffusers folder of a ``ControlNetModel``, or a single file with ``controlnet_config``
for its config; ``None`` loads no ControlNet (text to image, the panorama task).

``kind`` is ``sd15_controlnet`` (SD 1.x, and SD 2.x models driven through a ControlNet: one CLIP
text encoder) or ``sdxl_controlnet`` (two text encoders, pooled text and size conditioning).
A model of the other family, a UNet that is not text-to-image (depth or inpainting channels)
and a ControlNet made for another family are refused with an ``InputError`` naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..validation import InputError
from . import catalog
from .base_adapter import SD15_CONTROLNET, SDXL_CONTROLNET, ControlNetAdapter
from .loading import (
    LDM_UNET,
    LDM_VAE_PARTS,
    _expect_all,
    _first_line,
    _hub_failure,
    _scheduler,
    _single_file_model,
    locate,
    quiet_hub_deprecations,
    read_checkpoint,
)

LDM_CONTROLNET = "control_model."
LDM_TOKEN_EMBEDDINGS = {
    "text_encoder": (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",  # SD 1.x
        "cond_stage_model.model.token_embedding.weight",  # SD 2.x (OpenCLIP)
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",  # SDXL's first
    ),
    "text_encoder_2": ("conditioner.embedders.1.model.token_embedding.weight",),  # SDXL's second (OpenCLIP)
}
"""Where each text encoder's token embedding sits in an original-layout file: the check that it was loaded."""
FAMILY_NAMES = {SD15_CONTROLNET: "SD 1.5 (or SD 2.x) text-to-image", SDXL_CONTROLNET: "SDXL"}


@dataclass
class LoadedBase:
    """A loaded base model ready for :class:`~backend.pipelines.sampling.MultiViewSampler.from_adapter`."""

    adapter: ControlNetAdapter
    vae: AutoencoderKL
    scheduler: SchedulerMixin
    source: str


def load_controlnet_base(
    kind: str,
    source: str | os.PathLike,
    controlnet: str | os.PathLike | None,
    *,
    config: str | os.PathLike | None = None,
    controlnet_config: str | os.PathLike | None = None,
    offline: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedBase:
    """UNet, VAE, text encoder(s), tokenizer(s), noise schedule and (unless ``controlnet`` is None) the ControlNet."""
    if kind not in FAMILY_NAMES:
        raise InputError("base_kind", f"must be one of {sorted(FAMILY_NAMES)}, got {kind!r}")
    if offline is None:
        offline = catalog.hub_offline()
    where, ref = locate("source", source)
    with quiet_hub_deprecations():
        if where == "file":
            parts = _from_single_file(Path(ref), kind, config, offline, dtype)
        else:
            parts = _from_pretrained(ref, kind, offline or where == "folder", dtype)
        net = None if controlnet is None else load_controlnet(controlnet, kind, controlnet_config, offline, dtype)
    unet, vae, encoders, tokenizers, scheduler = parts
    if net is not None:
        _check_controlnet_fits(net, unet, kind)
    # SDXL's VAE overflows in float16 (its config says force_upcast): it decodes in float32.
    upcast = kind == SDXL_CONTROLNET and dtype == torch.float16 and vae.config.get("force_upcast", False)
    vae_dtype = torch.float32 if upcast else dtype
    adapter = ControlNetAdapter(unet, net, encoders, tokenizers)
    return LoadedBase(adapter.to(device, dtype).eval(), vae.to(device, vae_dtype), scheduler, str(source))


def _family_of(unet_config) -> str:
    return SDXL_CONTROLNET if unet_config.get("addition_embed_type") == "text_time" else SD15_CONTROLNET


def _check_unet(field: str, ref: str, unet_config, kind: str) -> None:
    """Refuse the other family and UNets with extra input channels, saying what the model is."""
    family = _family_of(unet_config)
    if family != kind:
        raise InputError(
            field, f"{ref} is an {FAMILY_NAMES[family]} model; use base kind {family} for it (kind {kind} "
            f"needs {FAMILY_NAMES[kind]}, e.g. {catalog.default_family_model(kind)})",
        )
    channels = int(unet_config.get("in_channels", 4))
    if channels != 4:
        raise InputError(
            field, f"{ref} has a UNet with {channels} input channels (a depth or inpainting model); a ControlNet "
            "base must be a text-to-image model (4 input channels)",
        )


def _from_pretrained(ref: str, kind: str, local_only: bool, dtype: torch.dtype):
    """Diffusers layout, local or hub; the UNet config is read first so a wrong family fails before any weights."""
    is_hub = not Path(ref).is_dir()
    try:
        unet_config = UNet2DConditionModel.load_config(ref, subfolder="unet", local_files_only=local_only)
    except (OSError, ValueError) as err:
        if is_hub:
            raise _hub_failure("source", ref, local_only, err) from None
        raise InputError("source", f"{ref} is not a diffusers model folder (no readable unet/config.json)") from None
    _check_unet("source", ref, unet_config, kind)
    load = {"local_files_only": local_only}
    weights = {**load, **_fp16_only(ref, "unet/")}
    try:
        unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet", torch_dtype=dtype, **weights)
        vae = AutoencoderKL.from_pretrained(ref, subfolder="vae", torch_dtype=dtype, **weights)
        encoders = [CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", **weights)]
        tokenizers = [CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **load)]
        if kind == SDXL_CONTROLNET:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder_2", **weights))
            tokenizers.append(CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **load))
        scheduler = _scheduler(ref, local_only)
    except (OSError, ValueError) as err:
        if is_hub:
            raise _hub_failure("source", ref, local_only, err) from None
        raise InputError("source", f"{ref}: incomplete diffusers model folder: {_first_line(err)}") from None
    return unet, vae, [e.eval() for e in encoders], tokenizers, scheduler


def _fp16_only(ref: str, weights_in: str) -> dict[str, str]:
    """``variant="fp16"`` for a folder downloaded with ``models download --fp16``, which holds only those files."""
    folder = Path(ref) / weights_in
    if not Path(ref).is_dir() or (folder / "diffusion_pytorch_model.safetensors").is_file():
        return {}
    return {"variant": "fp16"} if (folder / "diffusion_pytorch_model.fp16.safetensors").is_file() else {}


def _from_single_file(path: Path, kind: str, config, offline: bool, dtype: torch.dtype):
    """An original-layout checkpoint: each component converted by diffusers with configs from ``config``."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    state = read_checkpoint(path)
    if not any(key.startswith(LDM_UNET) for key in state):
        raise InputError("source", f"{path} is not a Stable Diffusion checkpoint in the original layout "
                                   f"(no {LDM_UNET}* weights); for a diffusers model pass its folder instead")
    where, ref = ("hub", catalog.default_family_model(kind)) if config is None else locate("config", config)
    if where == "file":
        raise InputError("config", f"{ref} is a file; config must be a diffusers model folder or a hub id")
    local_only = offline or where == "folder"
    field = "config" if config is not None else "source"
    try:
        unet_config = UNet2DConditionModel.load_config(ref, subfolder="unet", local_files_only=local_only)
        tokenizers = [CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", local_files_only=local_only)]
        if kind == SDXL_CONTROLNET:
            tokenizers.append(CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", local_files_only=local_only))
        scheduler = _scheduler(ref, local_only)
    except (OSError, ValueError) as err:
        if where == "hub" and config is None:
            raise InputError(
                "config", f"a single checkpoint file holds weights only; its configs and tokenizers come from {ref}, "
                f"which {'is not in the Hugging Face cache and hub downloads are off' if local_only else 'failed'} "
                f"({_first_line(err)}). Pass config=<local diffusers folder of a {FAMILY_NAMES[kind]} model>",
            ) from None
        if where == "hub":
            raise _hub_failure("config", ref, local_only, err) from None
        raise InputError("config", f"{ref} lacks a unet, tokenizer or scheduler config: {_first_line(err)}") from None
    _check_unet(field, ref, unet_config, kind)
    unet = _single_file_model(UNet2DConditionModel, path, state, ref, "unet", local_only, dtype)
    _expect_all(path, "UNet", sum(key.startswith(LDM_UNET) for key in state), unet)
    vae = _single_file_model(AutoencoderKL, path, state, ref, "vae", local_only, dtype)
    _expect_all(path, "VAE", sum(key.startswith(LDM_VAE_PARTS) for key in state), vae)
    classes = [("text_encoder", CLIPTextModel)]
    if kind == SDXL_CONTROLNET:
        classes.append(("text_encoder_2", CLIPTextModelWithProjection))
    encoders = []
    for subfolder, model_class in classes:
        key = next((key for key in LDM_TOKEN_EMBEDDINGS[subfolder] if key in state), None)
        if key is None:
            raise InputError("source", f"{path} holds no weights for the {subfolder} ({FAMILY_NAMES[kind]} layout)")
        try:
            encoder = create_diffusers_clip_model_from_ldm(
                model_class, state, subfolder=subfolder, config=ref, local_files_only=local_only,
            ).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise InputError("source", f"{path}: no {subfolder} the config of {ref} fits: {_first_line(err)}") from None
        # diffusers loads these without strict key checks: a file it misreads leaves random weights.
        if not torch.equal(encoder.get_input_embeddings().weight.float(), state[key].float()):
            raise InputError("source", f"{path}: the {subfolder} weights were not read into the config of {ref}")
        encoders.append(encoder)
    return unet, vae, encoders, tokenizers, scheduler


def load_controlnet(
    source: str | os.PathLike, kind: str, config, offline: bool, dtype: torch.dtype = torch.float32
) -> ControlNetModel:
    """A ``ControlNetModel`` from a hub id, a diffusers folder, or an original-layout file (+ ``config``)."""
    where, ref = locate("controlnet", source)
    local_only = offline or where == "folder"
    cast = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        if where == "file":
            state = read_checkpoint(Path(ref))
            config_ref = catalog.default_controlnet(kind) if config is None else str(config)
            net = ControlNetModel.from_single_file(
                state, config=config_ref, local_files_only=offline or Path(config_ref).is_dir(), **cast
            )
            # Files hold control_model.* weights, or (distributed alone) the same names without the prefix.
            found = sum(key.startswith(LDM_CONTROLNET) for key in state) or len(state)
            _expect_all(Path(ref), "ControlNet", found, net)
            return net.eval()
        return ControlNetModel.from_pretrained(ref, local_files_only=local_only, **cast, **_fp16_only(ref, "")).eval()
    except InputError as err:
        raise InputError("controlnet", err.problem) from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        if where == "hub":
            raise _hub_failure("controlnet", ref, local_only, err) from None
        raise InputError("controlnet", f"{ref} is not a ControlNet this backend can load: {_first_line(err)}") from None


def with_controlnet(adapter: ControlNetAdapter, net: ControlNetModel) -> ControlNetAdapter:
    """The same UNet and text encoders (shared, not copied) driven through ``net``, on their device and dtype."""
    _check_controlnet_fits(net, adapter.unet, adapter.kind)
    net = net.to(adapter.device, adapter.dtype).eval()
    return ControlNetAdapter(adapter.unet, net, list(adapter.text_encoders), adapter.tokenizers,
                             adapter.conditioning_scale)


def _check_controlnet_fits(net: ControlNetModel, unet: UNet2DConditionModel, kind: str) -> None:
    """A ControlNet adds to the UNet's skips: it must have been made for this family and these widths."""
    made_for = _family_of(net.config)
    same_widths = tuple(net.config.block_out_channels) == tuple(unet.config.block_out_channels[: len(
        net.config.block_out_channels)])
    if made_for != kind or net.config.cross_attention_dim != unet.config.cross_attention_dim or not same_widths:
        raise InputError(
            "controlnet", f"this ControlNet was made for {FAMILY_NAMES[made_for]} models with text width "
            f"{net.config.cross_attention_dim}; the base model is {FAMILY_NAMES[kind]} with text width "
            f"{unet.config.cross_attention_dim} (use e.g. {catalog.default_controlnet(kind)})",
        )
