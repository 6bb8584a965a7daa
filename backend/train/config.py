"""Training recipes as JSON: :class:`TrainConfig` and its parts, read with every field checked.

A recipe names the data, the base model and the three steps of MVDiffusion's two training
stages (mvdiffusion.md §10):

* stage 1, adapt the base model to the data: ``autoencoder`` (the VAE, when the base model's
  own does not fit the data; the tiny random one does not) and ``single_view`` (the UNet on
  single frames at the data's resolution);
* stage 2, ``multi_view``: the UNet frozen, only the CAA blocks (and, for the depth task, the
  interpolation module's condition branch) trained on whole trajectories.

``task`` picks the model: ``"depth"`` (SD 2 depth, 5 input channels, CAA blocks with ResNets and
the condition branch, trained on scene trajectories) or ``"panorama"`` (SD 2 base, 4 input
channels, the 9 CAA blocks alone, trained on views around one centre with rotation-only
correspondences, as the released panorama model).

A stage with ``steps`` 0 is skipped. Unknown keys, wrong types and values out of range are
refused with an :class:`~backend.validation.InputError` naming the field by its dotted path
(``multi_view.lr``), so a typo in a recipe fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import view_side
from ..validation import InputError

STAGES = ("autoencoder", "single_view", "multi_view")
TASKS = ("depth", "panorama")
PANORAMA_VIEWS = (8, 10)
"""View counts of a panorama sample: the ring of :func:`~backend.geometry.panorama.panorama_layout`,
alone or with its two pole views."""


@dataclass(frozen=True)
class DataConfig:
    """Synthetic training data (:mod:`backend.train.synthetic`).

    ``train`` trajectories are rendered for training; ``heldout`` trajectories, on camera paths
    never used in training, serve the evaluation. Views must be a multiple of 64 pixels on each
    side (the UNet's four levels under the VAE's factor 8). ``step_deg``: the range (degrees) the
    turn between consecutive views is drawn from; smaller turns mean more overlap, so each view
    has more CAA neighbours. ``multi_view_train``: trajectories for stage 2 drawn apart from stage
    1's (0: stage 2 reuses stage 1's). A small base model memorises its own training scenes, and
    on those CAA has little left to add; on fresh scenes it learns what it must do on new ones.

    For the panorama task the synthetic data are procedural landscapes
    (:mod:`backend.train.synthetic_panorama`): square views (``width`` = ``height``), ``views``
    8 (the ring) or 10 (ring and poles); ``step_deg`` is unused.
    """

    train: int = 64
    heldout: int = 8
    views: int = 8
    width: int = 64
    height: int = 64
    seed: int = 0
    step_deg: tuple[float, ...] = (15.0, 25.0)
    multi_view_train: int = 0


@dataclass(frozen=True)
class TrainModelConfig:
    """The model trained.

    ``base``: ``"tiny"`` builds the project's tiny SD 2 UNet of the task (depth or base) and text
    encoder in code (random weights) with an autoencoder of ``vae_channels``/``vae_groups``;
    anything else is a diffusers folder, hub id or checkpoint file of SD 2 depth (the depth
    task) or SD 2 base (the panorama task) (:func:`load_components`), whose
    own VAE is kept unless the ``autoencoder`` stage has steps. ``vae_init``: ``"box"`` starts
    the tiny VAE as the box codec (:func:`~backend.train.trainer.box_autoencoder`: exact 8x8 mean
    colours, 19.9 dB on the synthetic rooms before any training), ``"random"`` from random
    weights. ``unet_groups``: the tiny UNet's GroupNorm groups (32 as in SD 2, or a divisor of
    32). At 32 every norm of its 32-channel levels is per channel, which on small latents
    loses each channel's mean over the view, its overall colour: the base then cannot predict
    that part of the noise, and its samples take random colour casts. ``seed`` seeds the tiny weights.
    """

    base: str = "tiny"
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    vae_groups: int = 1
    vae_init: str = "box"
    unet_groups: int = 32
    seed: int = 0


@dataclass(frozen=True)
class StageConfig:
    """One training stage: AdamW at ``lr`` with cosine decay to ``min_lr`` over ``steps``.

    ``batch_size`` counts images (``autoencoder``, ``single_view``) or trajectories
    (``multi_view``). ``warmup_steps`` ramp the rate up linearly first. ``snr_gamma`` > 0
    weighs each sample's epsilon-MSE by ``min(1, snr_gamma / SNR(t))`` (min-SNR weighting, Hang
    et al. 2023: low-noise steps, which dominate the plain loss, count less); 0 is the plain
    epsilon-MSE of the released recipe. ``high_noise_weight`` > 1 weighs it by
    ``clamp(1 / SNR(t), 1, high_noise_weight)`` instead where the noise dominates (truncated-SNR
    weighting, Salimans and Ho 2022): there a small epsilon error is a large error in the clean
    latents the sampler's first steps move towards (at t = 999 it is multiplied by 200), so a
    small model that ignores it starts every sample from over-saturated noise. Unused by the
    autoencoder.
    """

    steps: int = 0
    batch_size: int = 8
    lr: float = 2e-4
    min_lr: float = 1e-7
    warmup_steps: int = 0
    weight_decay: float = 0.01
    snr_gamma: float = 0.0
    high_noise_weight: float = 1.0


@dataclass(frozen=True)
class AutoencoderStage(StageConfig):
    """The VAE: L1 reconstruction plus ``kl_weight`` times the KL term."""

    kl_weight: float = 1e-6


@dataclass(frozen=True)
class MultiViewStage(StageConfig):
    """Stage 2. ``interpolation_ratio``: share of steps that train the interpolation module
    (keyframes at both ends of a trajectory condition the frames between them); the others are
    keyframe generation steps, which get no condition at all, as at inference. The panorama
    model has no interpolation module: every step is a generation step."""

    interpolation_ratio: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. See the module docstring; ``python -m backend train --config``."""

    task: str = "depth"
    data: DataConfig = field(default_factory=DataConfig)
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    autoencoder: AutoencoderStage = field(default_factory=AutoencoderStage)
    single_view: StageConfig = field(default_factory=StageConfig)
    multi_view: MultiViewStage = field(default_factory=MultiViewStage)
    prompt_dropout: float = 0.1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 100

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object) -> TrainConfig:
        config = _build(cls, data, "")
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError("config", f"no such file: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError("config", f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.task not in TASKS:
            raise InputError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        d = self.data
        for name in ("train", "heldout", "views", "width", "height"):
            _at_least(f"data.{name}", getattr(d, name), 1)
        _at_least("data.multi_view_train", d.multi_view_train, 0)
        if d.views < 2:
            raise InputError("data.views", f"multi-view training needs at least 2 views, got {d.views}")
        for name in ("width", "height"):
            view_side(f"data.{name}", getattr(d, name))
        if self.task == "panorama":
            if d.views not in PANORAMA_VIEWS:
                raise InputError("data.views", f"a panorama has {' or '.join(map(str, PANORAMA_VIEWS))} views "
                                 f"(the ring, or the ring and the poles), got {d.views}")
            if d.width != d.height:
                raise InputError("data.height", f"panorama views are square: must equal data.width ({d.width}), "
                                 f"got {d.height}")
        if len(d.step_deg) != 2 or not 0 < d.step_deg[0] <= d.step_deg[1] <= 90:
            raise InputError("data.step_deg", f"must be [low, high] with 0 < low <= high <= 90, got {list(d.step_deg)}")
        m = self.model
        if not m.base:
            raise InputError("model.base", "must be 'tiny' or a model folder, hub id or checkpoint file")
        if len(m.vae_channels) != 4:
            raise InputError("model.vae_channels", f"needs 4 levels (factor 8, as SD 2's VAE), "
                             f"got {len(m.vae_channels)}")
        _at_least("model.vae_groups", m.vae_groups, 1)
        if m.unet_groups < 1 or 32 % m.unet_groups:
            raise InputError("model.unet_groups",
                             f"must divide 32 (the tiny UNet's narrowest level), got {m.unet_groups}")
        for k, channels in enumerate(m.vae_channels):
            _at_least(f"model.vae_channels[{k}]", channels, 1)
            if channels % m.vae_groups:
                raise InputError("model.vae_groups", f"must divide every VAE width; {m.vae_groups} does not divide "
                                 f"{channels}")
        if m.vae_init not in ("box", "random"):
            raise InputError("model.vae_init", f"must be 'box' or 'random', got {m.vae_init!r}")
        if m.vae_init == "box" and min(m.vae_channels) // m.vae_groups < 8:
            raise InputError("model.vae_groups", f"the box codec needs at least 8 channels per group; "
                             f"{min(m.vae_channels)} channels in {m.vae_groups} groups have "
                             f"{min(m.vae_channels) // m.vae_groups}")
        for name in STAGES:
            stage = self.stage(name)
            _at_least(f"{name}.steps", stage.steps, 0)
            _at_least(f"{name}.batch_size", stage.batch_size, 1)
            _at_least(f"{name}.warmup_steps", stage.warmup_steps, 0)
            _positive(f"{name}.lr", stage.lr)
            _in_range(f"{name}.min_lr", stage.min_lr, 0.0, stage.lr)
            _in_range(f"{name}.weight_decay", stage.weight_decay, 0.0, 10.0)
            _in_range(f"{name}.snr_gamma", stage.snr_gamma, 0.0, 1e6)
            _in_range(f"{name}.high_noise_weight", stage.high_noise_weight, 1.0, 1e6)
        _in_range("autoencoder.kl_weight", self.autoencoder.kl_weight, 0.0, 1.0)
        _in_range("multi_view.interpolation_ratio", self.multi_view.interpolation_ratio, 0.0, 1.0)
        _in_range("prompt_dropout", self.prompt_dropout, 0.0, 1.0)
        _positive("grad_clip", self.grad_clip)
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError("mixed_precision", f"must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if not self.device:
            raise InputError("device", "must be 'auto' or a torch device such as cpu or cuda")
        _at_least("log_every", self.log_every, 1)
        _at_least("save_every", self.save_every, 1)


def check_same_recipe(config: TrainConfig, saved: dict, path: Path) -> None:
    """Refuse to resume a run folder with another recipe than it was started with, naming the first field.

    Fields the saved recipe lacks take their defaults, so runs started before a field existed
    resume as long as they used what is now its default.
    """
    ours = config.to_dict()
    try:
        saved = TrainConfig.from_dict(saved).to_dict()
    except InputError:
        pass  # compared as written: the first difference is then named below

    def differences(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                yield from differences(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            yield prefix.rstrip(".")

    changed = list(differences(ours, saved))
    if changed:
        raise InputError(
            changed[0], f"differs from the recipe the run in {path.parent} was started with "
            f"({len(changed)} field(s): {', '.join(changed[:5])}); use a new run folder"
        )


# ---------------------------------------------------------------------- reading
def _build(cls: type, data: object, prefix: str):
    """A dataclass from a JSON object; every key must be a field, every value of the field's type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise InputError(where, f"must be a JSON object, got {_json_type(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(fields)}"
            raise InputError(f"{prefix}{key}", f"unknown field{hint}")
    values = {key: _value(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _value(hint, value: object, name: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise InputError(name, f"must be a list, got {_json_type(value)}")
        item = typing.get_args(hint)[0]
        return tuple(_value(item, v, f"{name}[{k}]") for k, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported field type {hint}")  # not used by the config classes
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(name, f"must be true or false, got {_json_type(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(name, f"must be an integer, got {_json_type(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(name, f"must be a number, got {_json_type(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(name, f"must be a string, got {_json_type(value)}")
        return value
    raise TypeError(f"unsupported field type {hint}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise InputError(name, f"must be >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise InputError(name, f"must be a positive number, got {value}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(name, f"must lie in [{low}, {high}], got {value}")
