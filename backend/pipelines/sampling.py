"""The denoising loop shared by the multi-view pipelines: text, guidance, progress, cancel, decode.

All views of a job and both guidance halves go through the UNet in one batch (unconditional
views first, then the text-conditioned ones, each half with its views consecutive), so CAA
mixes views within a half and never across them, as in the released code.

The model is reached through a base model adapter (``backend/models/base_adapter.py``): SD 2
inside the trained multi-view UNet, or an SD 1.5 / SDXL UNet with a depth ControlNet. The loop
only hands it latents, the timestep, the text conditioning and each view's control input.

The loop steps whichever scheduler the settings name (``backend/sampling_options.py``): a new
instance per run, built from the model's training schedule, since one sampler serves every job
of a process and multistep schedulers keep state between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import AutoencoderKL, SchedulerMixin

from ..models.base_adapter import BaseModelAdapter, LatentChannelsAdapter, TextConditioning
from ..models.catalog import base_family
from ..models.mv_unet import MultiViewUNet
from ..models.schedulers import build_scheduler, clean_estimate, step
from ..protocol import check_prompt_count
from ..sampling_options import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, scheduler_name
from ..validation import InputError, in_range, positive_int
from .training_free import TrainingFree


class Cancelled(RuntimeError):
    """Raised inside a pipeline when its cancel event is set; the job stops within one step."""


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each denoising step."""

    step: int  # 1-based
    total: int
    timestep: int
    latents: torch.Tensor  # x_t-1 of every view
    predicted: torch.Tensor  # the current estimate of the clean latents of every view


ProgressCallback = Callable[[StepInfo], None]


@dataclass
class SamplingSettings:
    """One run's sampling options; the defaults (``backend/sampling_options.py``) are the released MVDiffusion's."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    negative_prompt: str = ""
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER  # a name of backend.sampling_options.SCHEDULERS
    # Both guidance halves in one UNet call is fastest; one call per half halves the peak memory
    # of a step (the halves never exchange anything, so the results are the same up to rounding).
    split_guidance: bool = False

    @classmethod
    def of(cls, settings, **options) -> SamplingSettings:
        """The sampling part of a job's ``GenerationSettings`` (``backend/protocol.py``): every field
        the two share, by name, plus this run's ``options`` (such as ``split_guidance``)."""
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls(**{**shared, **options})

    def validated(self) -> SamplingSettings:
        positive_int("steps", self.steps)
        in_range("guidance_scale", self.guidance_scale, 0.0, 100.0)
        if not isinstance(self.seed, int):
            raise InputError("seed", f"must be an integer, got {self.seed!r}")
        scheduler_name("scheduler", self.scheduler)
        return self


def view_prompts(prompts: str | Sequence[str], views: int) -> list[str]:
    """One prompt per view: a single prompt is repeated, a list must match the view count."""
    if isinstance(prompts, str):
        return [prompts] * views
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts", "must be text")
    check_prompt_count(len(prompts), views)
    return prompts * views if len(prompts) == 1 else prompts


class MultiViewSampler:
    """Text encoding, the guided denoising loop over all views, and decoding; no task specifics.

    ``scheduler`` (any diffusers scheduler) gives only the model's training schedule, its config;
    every run builds the scheduler its settings name from that config and steps it alone.

    Built from the SD 2 parts (``model`` the trained multi-view UNet), or with
    :meth:`from_adapter` for any base. ``model`` is what the pipelines inspect (its ``task``,
    ``released`` and ``condition``): the multi-view UNet, or the adapter itself for other bases.
    """

    def __init__(self, model: MultiViewUNet, vae: AutoencoderKL, text_encoder, tokenizer, scheduler, *,
                 adapter: BaseModelAdapter | None = None):
        self.adapter = adapter if adapter is not None else LatentChannelsAdapter(model, text_encoder, tokenizer)
        self.model, self.vae = model, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.schedule = scheduler.config  # a FrozenDict: read by every run, changed by none

    @classmethod
    def from_adapter(cls, adapter: BaseModelAdapter, vae: AutoencoderKL, scheduler) -> MultiViewSampler:
        """A sampler driving any base model through its adapter."""
        if isinstance(adapter, LatentChannelsAdapter):
            return cls(adapter.model, vae, adapter.text_encoder, adapter.tokenizer, scheduler, adapter=adapter)
        return cls(adapter, vae, adapter.text_encoders[0], adapter.tokenizers[0], scheduler, adapter=adapter)

    @property
    def base_kind(self) -> str:
        """The adapter's kind: ``sd2_depth``, ``sd15_controlnet`` or ``sdxl_controlnet``."""
        return self.adapter.kind

    @property
    def native_size(self) -> int:
        """The square view size, in pixels, the base model's family was trained at (the catalog's)."""
        return base_family(self.base_kind).view_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def view_multiple(self) -> int:
        """What every view's width and height must be a multiple of: the VAE's factor times the 8 that
        the UNet's three halvings need (64 for every Stable Diffusion family)."""
        return 8 * self.latent_factor

    def check_views(self, cameras: Sequence) -> tuple[int, int]:
        """(width, height) shared by every view, a multiple of :attr:`view_multiple`."""
        if len(cameras) == 0:
            raise InputError("cameras", "need at least one view")
        width, height = cameras[0].width, cameras[0].height
        factor = self.view_multiple
        if any((c.width, c.height) != (width, height) for c in cameras) or width % factor or height % factor:
            raise InputError("cameras", f"all views must share one size, a multiple of {factor} pixels")
        return width, height

    def new_scheduler(self, name: str = DEFAULT_SCHEDULER) -> SchedulerMixin:
        """A fresh scheduler ``name`` on the model's training schedule, for one run only."""
        return build_scheduler(name, self.schedule)

    def on_device(self, geometry: dict | None) -> dict | None:
        if geometry is None:
            return None
        return {key: level.to(self.device, self.dtype) for key, level in geometry.items()}

    def generate(
        self,
        prompts: list[str],
        size: tuple[int, int],
        settings: SamplingSettings,
        geometry: dict | None,
        *,
        latents: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        training_free: TrainingFree | None = None,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Noise (from the seed unless given; unit variance) -> guided denoising -> float images (V, H, W, 3).

        ``control``: each view's control input for the base model (``BaseModelAdapter.depth_control``,
        or an SD 2 UNet's extra input channels). ``training_free``: attention across views, canvas
        synchronisation and known content (:mod:`~backend.pipelines.training_free`)."""
        width, height = size
        if latents is None:
            latents = self.initial_noise(len(prompts), height, width, settings.seed)
        text, negative = self.encode_text(prompts, settings, size)
        latents = self.denoise(latents, text, negative, settings, geometry, control, progress, cancel, condition,
                               training_free)
        return self.decode(latents), latents

    def encode_text(
        self, prompts: list[str], settings: SamplingSettings, size: tuple[int, int]
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """The prompts' conditioning and, when guidance runs, the negative prompt's; ``size`` is (width, height)."""
        negative = [settings.negative_prompt] * len(prompts) if settings.guidance_scale > 1.0 else None
        return self.adapter.encode_prompts(prompts, negative, size)

    def initial_noise(self, views: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Independent unit Gaussian noise per view from one seed, the same on every device.

        The loop scales it by its scheduler's ``init_noise_sigma`` (1 for DDIM, DPM-Solver and UniPC).
        """
        generator = torch.Generator("cpu").manual_seed(seed)
        channels = self.vae.config.latent_channels
        noise = torch.randn(views, channels, height // self.latent_factor, width // self.latent_factor,
                            generator=generator)
        return noise.to(self.device, self.dtype)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        text: TextConditioning,
        negative: TextConditioning | None,
        settings: SamplingSettings,
        geometry: dict | None,
        control: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        condition: torch.Tensor | None = None,
        training_free: TrainingFree | None = None,
    ) -> torch.Tensor:
        """Run the guided loop from unit-variance ``latents``; ``control`` (one per view) goes with
        every model call, the same for both guidance halves.

        ``condition`` (V, 5, h, w) feeds the interpolation module's condition branch, the same for
        both guidance halves. The scheduler is ``settings.scheduler``, new for this run.
        ``training_free``: attention across views, canvas synchronisation and known content
        (:mod:`~backend.pipelines.training_free`), applied to the guided prediction of every step.
        """
        settings.validated()
        guided = settings.guidance_scale > 1.0
        if guided and negative is None:
            raise ValueError("guidance needs the negative prompt's conditioning")
        embeds = TextConditioning.cat([negative, text]) if guided else text
        if control is not None:
            control = torch.cat([control] * 2) if guided else control
        scheduler = self.new_scheduler(settings.scheduler)
        scheduler.set_timesteps(settings.steps, device=self.device)
        timesteps = scheduler.timesteps
        latents = latents * scheduler.init_noise_sigma
        extras = training_free.to(self.device, self.dtype) if training_free is not None else None
        attention = extras.attention if extras is not None else None
        # The geometry of attention across views reaches the UNet's processors as a call argument.
        attention_kwargs = attention.kwargs() if attention is not None else None
        for index, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before step {index + 1} of {len(timesteps)}")
            scaled = scheduler.scale_model_input(latents, t)
            model_input = torch.cat([scaled] * 2) if guided else scaled
            if guided and settings.split_guidance:
                controls = [None, None] if control is None else control.chunk(2)
                halves = zip(model_input.chunk(2), embeds.chunk(2), controls, strict=True)
                noise = torch.cat([
                    self.adapter(x, t, e, c, geometry=geometry, condition=condition, attention_kwargs=attention_kwargs)
                    for x, e, c in halves
                ])
            else:
                noise = self.adapter(model_input, t, embeds, control, geometry=geometry, condition=condition,
                                     attention_kwargs=attention_kwargs)
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + settings.guidance_scale * (text - uncond)
            if extras is not None:
                noise = extras.adjust(scheduler, noise, t, scaled, index, len(timesteps))
            latents = step(scheduler, noise, t, latents)
            if progress is not None:
                predicted = clean_estimate(scheduler, noise, t, scaled)
                progress(StepInfo(index + 1, len(timesteps), int(t), latents, predicted))
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (V, 4, h, w) -> float images (V, H, W, 3) in [0, 1], one view at a time."""
        images = []
        for view in latents:
            latent = view[None].to(self.vae.dtype) / self.vae.config.scaling_factor  # SDXL's VAE may be float32
            image = self.vae.decode(latent, return_dict=False)[0]
            images.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(images)


def preview(sampler: MultiViewSampler, info: StepInfo, views: Sequence[int] | None = None) -> np.ndarray:
    """Decoded uint8 previews of the current clean-image estimate of some views (all by default).

    Decoding costs about as much as a UNet step per view at full size, so callers usually ask
    for one or two views every few steps.
    """
    chosen = range(info.predicted.shape[0]) if views is None else views
    return to_uint8(sampler.decode(info.predicted[list(chosen)]))


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
