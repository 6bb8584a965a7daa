"""Download base models (and depth ControlNets) from the Hugging Face hub into the models folder.

``huggingface_hub.snapshot_download`` with ``local_dir=<models>/hub/OWNER--NAME`` writes a plain
diffusers folder there (not the shared Hugging Face cache): the folder is what the engine picks
up by itself, and a user can copy it or pass it as ``--depth-model``. Only what the pipeline
loads is fetched (:data:`ALLOW_PATTERNS`): the configs, the tokenizer files and the safetensors
weights of the UNet, VAE and text encoder. The repositories' ``.ckpt`` / ``.bin`` duplicates, the
safety checker and the feature extractor would triple the download for nothing.

``fp16=True`` fetches the ``.fp16.safetensors`` variant instead of the float32 weights (half
the size); the loader uses that variant for a folder that holds only it.

The same patterns serve SDXL repositories (their second text encoder and tokenizer) and
ControlNet repositories (one ``config.json`` and one weight file at the top); which weights must
have arrived is read from what the snapshot holds (:func:`required_weights`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..validation import InputError
from . import catalog

FIELD = "model"
CONFIG_PATTERNS = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*.json",
    "tokenizer/*.txt",
    "text_encoder_2/config.json",
    "tokenizer_2/*.json",
    "tokenizer_2/*.txt",
    "config.json",
)
WEIGHT_FILES = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")
SDXL_WEIGHT_FILES = ("text_encoder_2/model",)
CONTROLNET_WEIGHT_FILES = ("diffusion_pytorch_model",)


def allow_patterns(fp16: bool = False) -> list[str]:
    """What a snapshot fetches: configs, tokenizers, and one safetensors file per weighted component."""
    suffix = ".fp16.safetensors" if fp16 else ".safetensors"
    names = (*WEIGHT_FILES, *SDXL_WEIGHT_FILES, *CONTROLNET_WEIGHT_FILES)
    return [*CONFIG_PATTERNS, *(name + suffix for name in names)]


def required_weights(folder: Path) -> tuple[str, ...]:
    """The weight files a downloaded folder must hold: a pipeline's components (SDXL's second text
    encoder when its ``model_index.json`` lists one), or a lone model's (a ControlNet)."""
    index = folder / "model_index.json"
    if index.is_file():
        return WEIGHT_FILES + (SDXL_WEIGHT_FILES if "text_encoder_2" in index.read_text() else ())
    return CONTROLNET_WEIGHT_FILES


def download_kind(
    kind: str, *, root: str | os.PathLike | None = None, fp16: bool = False, token: str | None = None,
) -> list[tuple[str, Path]]:
    """Everything a base kind of :data:`~backend.models.catalog.BASE_KINDS` runs on: SD 2 depth and
    base, or the family's model and its depth ControlNet. Returns (hub id, folder) of each."""
    if kind == catalog.DEFAULT_BASE_KIND:
        return [download_base(name, root=root, fp16=fp16, token=token) for name in ("depth", "base")]
    return [download_base(repo, root=root, fp16=fp16, token=token)
            for repo in (catalog.default_family_model(kind), catalog.default_controlnet(kind))]


def download_base(
    name: str, *, root: str | os.PathLike | None = None, fp16: bool = False, token: str | None = None,
) -> tuple[str, Path]:
    """Download a base model: ``name`` is a kind (``depth``, ``base``, ``inpaint``: its catalog ids are
    tried in order) or a hub id. Returns (hub id, folder)."""
    if catalog.hub_offline():
        raise InputError(
            FIELD, "hub downloads are off because HF_HUB_OFFLINE is set; unset it (or set it to 0) and run again",
        )
    candidates = catalog.base_models(name) if name in catalog.BASE_MODELS else (name,)
    token = token or os.environ.get(catalog.TOKEN_ENV) or None
    failures = []
    for repo_id in candidates:
        try:
            return repo_id, snapshot(repo_id, catalog.hub_folder(repo_id, root), fp16=fp16, token=token)
        except InputError as err:
            failures.append(err.problem)
    tried = "; ".join(failures)
    raise InputError(FIELD, f"no source for {name!r} could be downloaded: {tried}")


def snapshot(repo_id: str, folder: Path, *, fp16: bool = False, token: str | None = None) -> Path:
    """One repository into ``folder``, restricted to :func:`allow_patterns`; checks every weight file arrived."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        snapshot_download(repo_id, local_dir=folder, allow_patterns=allow_patterns(fp16), token=token)
    except GatedRepoError:
        raise InputError(
            FIELD, f"{repo_id} is gated: accept its terms on huggingface.co and pass --token (or set "
            f"{catalog.TOKEN_ENV})",
        ) from None
    except RepositoryNotFoundError:
        raise InputError(FIELD, f"{repo_id} is not on the hub (withdrawn, private, or misspelt)") from None
    except HfHubHTTPError as err:
        raise InputError(FIELD, f"{repo_id}: the hub answered {_first_line(err)}") from None
    except Exception as err:  # connection refused, DNS, proxy, timeouts: huggingface_hub raises many kinds
        raise InputError(
            FIELD, f"cannot download {repo_id} ({type(err).__name__}: {_first_line(err)}); check the network "
            "connection (in Blender: Edit > Preferences > System > Network > Allow Online Access)",
        ) from None
    suffix = ".fp16.safetensors" if fp16 else ".safetensors"
    absent = [name + suffix for name in required_weights(folder) if not (folder / (name + suffix)).is_file()]
    if absent:
        hint = "; download without --fp16" if fp16 else ""
        raise InputError(FIELD, f"{repo_id} has no {', '.join(absent)}{hint}")
    return folder


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
