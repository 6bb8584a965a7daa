"""Stable Diffusion 2 at its real size: the exact architectures, with random weights, built offline.

The tiny models (:mod:`.tiny`) keep SD 2's structure at a few megabytes; these keep its widths,
so memory, dtype and shape problems that only appear at 320-1280 channels show up without a
download. The configs below are those of the hub repositories ``stabilityai/stable-diffusion-2-depth``,
``stabilityai/stable-diffusion-2-base`` and ``stabilityai/stable-diffusion-2-inpainting`` (their
``unet/``, ``vae/`` and ``text_encoder/config.json``; the ``sd2-community`` mirrors hold the same
files), written out here so nothing is fetched:

* UNet (865.9 M parameters): ``block_out_channels`` 320/640/1280/1280, two layers per block,
  cross attention on the first three levels with ``attention_head_dim`` 5/10/20/20 (SD 2 names
  the head *count* there: 64-channel heads), linear projections in the transformers, 1024-wide
  text context. The three differ only in ``in_channels``: 4 (base), 5 (depth: latent + depth),
  9 (inpainting: latent + mask + masked-image latent). ``sample_size`` is 64 latents (512
  pixels) for all three; it only sets a pipeline's default image size, which every pipeline here
  passes explicitly.
* VAE (83.7 M): ``block_out_channels`` 128/256/512/512, two layers per block, 4 latent channels,
  scaling factor 0.18215, downscale factor 8.
* Text encoder (340.4 M): OpenCLIP ViT-H/14's text tower as a transformers ``CLIPTextModel``,
  hidden size 1024, 16 heads, MLP 4096 with GELU, 77 positions, vocabulary 49408, 23 layers
  (the 24-layer tower minus its last layer: SD 2 conditions on the penultimate layer's output).
  ``bos/eos/pad`` ids 0/2/1 are what the hub config says; only the last hidden state is used.
* Tokenizer: the offline byte-level CLIP tokenizer of :func:`.tiny.tiny_tokenizer` (one token
  per character, ids below 514), not SD 2's BPE vocabulary, which only exists as a download. Its
  ids are valid for the 49408-entry embedding table.
* Scheduler: :func:`.tiny.tiny_scheduler`, DDIM with :data:`.tiny.SD2_SCHEDULER` (SD 2's epsilon schedule).

Random weights. A model is built on the ``meta`` device (no memory, no initialisation) and every
tensor is then filled uniformly at PyTorch's default scale for its layer: linear and
convolution weights and biases in +-1/sqrt(fan_in), GroupNorm/LayerNorm weights 1 and biases 0,
embeddings with CLIP's standard deviation 0.02, so the network's activations stay finite as in a
freshly constructed model. The values are windows of one pool of random numbers, at a random
place per tensor (:class:`UniformDraws`): PyTorch's own initialisation of the UNet takes 14 s on
two CPU cores, these draws 1.5 s. Folders are written in float16 (half the disk and write time);
diffusers and transformers load them into float32 models.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..validation import InputError
from .loading import KIND_IN_CHANNELS
from .tiny import CAA_WEIGHTS, MAX_TOKENS, TASK_OF_KIND, sd2_pipeline, tiny_scheduler, tiny_tokenizer

SD2_CHANNELS = (320, 640, 1280, 1280)

SD2_UNET = {
    "sample_size": 64,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": SD2_CHANNELS,
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": False,
}
"""SD 2 base/depth/inpainting's UNet config without ``in_channels`` (see :func:`unet_config`)."""

SD2_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
"""SD 2's VAE (the same in the base, depth and inpainting repositories)."""

SD2_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
"""SD 2's OpenCLIP ViT-H text encoder as ``CLIPTextConfig`` keyword arguments."""

EMBEDDING_STD = 0.02
NORMS = (nn.GroupNorm, nn.LayerNorm)


def unet_config(kind: str) -> dict:
    """The UNet config of the SD 2 model for ``kind`` (``depth``, ``base`` or ``inpaint``)."""
    if kind not in KIND_IN_CHANNELS:
        raise InputError("kind", f"must be one of {sorted(KIND_IN_CHANNELS)}, got {kind!r}")
    return {**SD2_UNET, "in_channels": KIND_IN_CHANNELS[kind]}


# ------------------------------------------------------------------------------------------- models on meta
def empty_unet(kind: str) -> UNet2DConditionModel:
    """SD 2's UNet for ``kind`` on the meta device: the structure and shapes, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(kind))


def empty_vae() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**SD2_VAE)


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(**SD2_TEXT_ENCODER)


def empty_text_encoder() -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(text_encoder_config())


# ------------------------------------------------------------------------------------------- random weights
def random_state_dict(
    model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random values for every tensor of ``model``'s state dict (the model itself may be on meta).

    Each tensor is drawn uniformly at PyTorch's default scale for its layer (module docstring),
    directly in ``dtype``.
    """
    draws = UniformDraws(seed, dtype)
    state = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(prefix=prefix, recurse=False):
            state[name] = _draw(module, name.rsplit(".", 1)[-1], tuple(param.shape), draws)
    for name, buffer in model.state_dict(keep_vars=True).items():
        if name not in state:  # persistent buffers; none of the SD 2 models has one
            raise ValueError(f"no rule for drawing the buffer {name} {tuple(buffer.shape)}")
    return state


class UniformDraws:
    """Uniform values in [-bound, bound) from one pool of random numbers, each tensor a window of it.

    Drawing every value of the SD 2 UNet with ``uniform_`` takes 2.3 s in float32 and 4.5 s in
    float16 on two CPU cores; a window of a pool drawn once is a scaled copy (1.5 s in float16).
    Every tensor starts at its own random place in the pool (16.8 M values, more than any SD 2 UNet
    or CAA tensor holds), so tensors differ from each other, although two windows that overlap
    hold the same values shifted; a tensor larger than the pool (the text encoder's token
    embedding) repeats it.
    """

    POOL = 2**24

    def __init__(self, seed: int, dtype: torch.dtype):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.pool = torch.empty(self.POOL).uniform_(-1.0, 1.0, generator=self.generator).to(dtype)

    def uniform(self, shape: tuple[int, ...], bound: float) -> torch.Tensor:
        count = math.prod(shape)
        if count > self.POOL:
            values = self.pool.repeat(-(-count // self.POOL))[:count]
        else:
            start = int(torch.randint(0, self.POOL - count + 1, (1,), generator=self.generator))
            values = self.pool[start:start + count]
        return values.mul(bound).view(shape)

    def constant(self, shape: tuple[int, ...], value: float) -> torch.Tensor:
        return torch.full(shape, value, dtype=self.dtype)


def _draw(module: nn.Module, name: str, shape: tuple[int, ...], draws: UniformDraws) -> torch.Tensor:
    if isinstance(module, NORMS):
        return draws.constant(shape, 1.0 if name == "weight" else 0.0)
    if isinstance(module, nn.Embedding):
        bound = EMBEDDING_STD * math.sqrt(3.0)  # uniform with standard deviation 0.02
    else:
        weight = getattr(module, "weight", None)
        reference = shape if len(shape) > 1 or weight is None else tuple(weight.shape)
        fan_in = math.prod(reference[1:]) if len(reference) > 1 else reference[0]
        bound = 1.0 / math.sqrt(max(fan_in, 1))
    return draws.uniform(shape, bound)


def materialise(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A meta-device model made real on the CPU with :func:`random_state_dict` values.

    Models with non-persistent buffers (the CLIP text encoder's ``position_ids``) are refused:
    their values cannot be drawn, and such models come from :func:`write_sd2_model` folders.
    """
    persistent = set(model.state_dict())
    transient = [name for name, _ in model.named_buffers() if name not in persistent]
    if transient:
        raise ValueError(f"{type(model).__name__} has non-persistent buffers ({', '.join(transient)})")
    model.load_state_dict(random_state_dict(model, seed, dtype), assign=True)
    return model.eval()


def random_unet(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """SD 2's UNet for ``kind`` with random weights, in memory (a few seconds; 3.5 GB in float32)."""
    return materialise(empty_unet(kind), seed, dtype)


def randomise_added_modules(model, seed: int = 0) -> None:
    """Random (not identity) weights for a :class:`~.mv_unet.MultiViewUNet`'s CAA blocks and condition branch.

    The blocks' zero-initialised output layers get the same default-scale draw as every other
    layer, so each block really changes its input. Works on a model whose base UNet is on meta.
    """
    for index, module in enumerate(model.added_modules().values()):
        reference = next(module.parameters())
        device = "cpu" if reference.is_meta else reference.device
        state = random_state_dict(module, seed + index, reference.dtype)
        module.load_state_dict({key: value.to(device) for key, value in state.items()}, assign=reference.is_meta)


# ------------------------------------------------------------------------------------------- folders
def write_sd2_model(
    folder: str | os.PathLike,
    kind: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    *,
    shared_from: str | os.PathLike | None = None,
    caa: bool = True,
) -> Path:
    """Write a complete diffusers folder of the SD 2 model for ``kind`` with random weights.

    The layout is that of the hub repository (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``), so :func:`~.loading.load_components` and
    ``ModelSet`` load it as they would the real model; the depth estimator, safety checker and
    feature extractor are recorded as absent. Weights are stored in ``dtype``.

    ``shared_from``: a folder written before whose VAE and text encoder files are linked (or
    copied) instead of drawn again; SD 2's three repositories share them too. ``caa``: also write
    ``caa.safetensors`` with random CAA blocks (and for the depth kind the condition branch), which
    ``ModelSet`` loads from the folder, so multi-view runs exercise every added block.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"unet": empty_unet(kind), "vae": empty_vae(), "text_encoder": empty_text_encoder(),
             "tokenizer": tiny_tokenizer(), "scheduler": tiny_scheduler()}
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    _write_diffusers(unet, random_state_dict(unet, seed, dtype), folder / "unet")
    if shared_from is not None:
        for part in ("vae", "text_encoder"):
            _link_tree(Path(shared_from) / part, folder / part)
    else:
        _write_diffusers(vae, random_state_dict(vae, seed + 1, dtype), folder / "vae")
        text_encoder.config.architectures = [type(text_encoder).__name__]
        text_encoder.config.save_pretrained(folder / "text_encoder")
        weights = random_state_dict(text_encoder, seed + 2, dtype)
        save_file(weights, str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    # What save_pretrained writes for the pipeline; built from the meta components, it costs nothing.
    sd2_pipeline(kind, **parts).save_config(folder)
    if caa:
        _write_random_caa(unet, kind, seed + 3, dtype, folder / CAA_WEIGHTS)
    return folder


def write_sd2_models(
    directory: str | os.PathLike,
    kinds: Iterable[str] = ("depth", "base"),
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    caa: bool = True,
) -> dict[str, Path]:
    """:func:`write_sd2_model` for each kind under ``directory/<kind>``, the layout ``ModelConfig.root`` reads.

    The first folder's VAE and text encoder are shared with the others (hard links where the
    file system allows). Depth and base in float16 take 5.0 GB of disk (4.0 GB without ``caa``).
    """
    root, written = Path(directory), {}
    for kind in kinds:
        first = next(iter(written.values()), None)
        written[kind] = write_sd2_model(root / kind, kind, seed, dtype, shared_from=first, caa=caa)
    return written


def _write_diffusers(model, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """What ``save_pretrained`` writes (config.json and the safetensors weights) for a model on meta."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_file(dict(state), str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        destination = target / path.name
        destination.unlink(missing_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(path, destination)


def _write_random_caa(unet: UNet2DConditionModel, kind: str, seed: int, dtype: torch.dtype, path: Path) -> None:
    """Random added blocks for ``unet`` (on meta), saved as :func:`~.weights.save_added_weights` does."""
    from .mv_unet import MultiViewUNet
    from .weights import save_added_weights

    with torch.device("meta"):
        model = MultiViewUNet(unet, TASK_OF_KIND[kind], with_condition=kind == "depth").to(dtype)
    randomise_added_modules(model, seed)
    save_added_weights(model, path)
