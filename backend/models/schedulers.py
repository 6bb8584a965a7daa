"""Noise schedulers for the denoising loop: built by name from a model's schedule, stepped generically.

The names, their diffusers classes and options live in :mod:`backend.sampling_options`. A model
comes with one scheduler config (its training schedule: betas, prediction type, timestep spacing
and offset); :func:`build_scheduler` makes a new scheduler of any listed class from it. Multistep
schedulers (DPM-Solver++, UniPC) keep the previous model outputs between steps, so a loop must
step an instance of its own, made for that run and thrown away afterwards.

Only DDIM's step output carries ``pred_original_sample``; :func:`clean_estimate` computes the
same estimate for every scheduler from the model output and the training schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin

from ..sampling_options import DEFAULT_SCHEDULER, SCHEDULERS, scheduler_name


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers class behind a scheduler name of :data:`~backend.sampling_options.SCHEDULERS`."""
    return getattr(diffusers, SCHEDULERS[scheduler_name("scheduler", name)].diffusers_class)


def build_scheduler(name: str = DEFAULT_SCHEDULER, config: Mapping[str, Any] | None = None) -> SchedulerMixin:
    """A new scheduler ``name`` on the schedule of ``config`` (any scheduler class's config, or its dict).

    Keys the target class does not take (DDIM's ``clip_sample`` for DPM-Solver, PNDM's
    ``skip_prk_steps``, ``_class_name``) are dropped; the table's options for ``name`` are applied
    on top, so ``dpm++2m`` is always DPM-Solver++ of order 2 whatever the config said.
    """
    cls = scheduler_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    kept = {key: value for key, value in (config or {}).items() if key in accepted}
    return cls.from_config({**kept, **SCHEDULERS[name].options})


def step(scheduler: SchedulerMixin, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """One deterministic step; ``eta=0`` goes only to schedulers that take an ``eta`` (DDIM)."""
    extra = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(model_output, timestep, sample, **extra).prev_sample


def clean_estimate(
    scheduler: SchedulerMixin, model_output: torch.Tensor, timestep, sample: torch.Tensor
) -> torch.Tensor:
    """The clean latents x_0 that ``model_output`` implies for ``sample`` (x_t) at ``timestep``.

    ``sample`` is the model's input after ``scale_model_input``, where x_t = sqrt(a) x_0 +
    sqrt(1 - a) eps with a = ``alphas_cumprod[t]`` for every scheduler (sigma-space schedulers
    such as Euler scale their latents into it). The arithmetic is DDIM's own, so for DDIM this is
    its ``pred_original_sample`` exactly (without ``clip_sample`` or thresholding, which SD 2 has off).
    """
    alpha = scheduler.alphas_cumprod[int(round(float(timestep)))]
    beta = 1 - alpha
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - beta ** (0.5) * model_output) / alpha ** (0.5)
    if kind == "v_prediction":
        return (alpha**0.5) * sample - (beta**0.5) * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"no clean estimate for prediction_type {kind!r} (epsilon, v_prediction or sample)")


def model_output_from_clean(
    scheduler: SchedulerMixin, clean: torch.Tensor, timestep, sample: torch.Tensor
) -> torch.Tensor:
    """The model output that implies the clean latents ``clean`` for ``sample`` (x_t) at ``timestep``.

    The inverse of :func:`clean_estimate`: the noise is what x_t holds besides ``clean``,
    eps = (x_t - sqrt(a) x_0) / sqrt(1 - a), expressed in the scheduler's prediction type. A
    scheduler stepped with it continues from ``clean`` as if the model had predicted it, whatever
    the scheduler does with a model output (DDIM's step, DPM-Solver's multistep history).
    """
    alpha = scheduler.alphas_cumprod[int(round(float(timestep)))].to(sample.device)
    beta = 1 - alpha
    noise = (sample - alpha**0.5 * clean) / beta**0.5
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise.to(sample.dtype)
    if kind == "v_prediction":
        return (alpha**0.5 * noise - beta**0.5 * clean).to(sample.dtype)
    if kind == "sample":
        return clean
    raise ValueError(f"no model output for prediction_type {kind!r} (epsilon, v_prediction or sample)")
