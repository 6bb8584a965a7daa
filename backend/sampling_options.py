"""The sampling options a job can choose, and their defaults: defined here and nowhere else.

The wire format, the command line, the Blender add-on, the headless scripts and the denoising
loop all read these names and numbers from this module. It uses only the standard library, so
Blender's own Python imports it; ``backend/models/schedulers.py`` turns a name into a diffusers
scheduler.

Every scheduler here solves the same probability-flow ODE of the model's training schedule, so
each one is built from the model's own scheduler config (betas, prediction type, timestep
offset) and differs only in how many steps it needs. DDIM at 50 steps is what the released
MVDiffusion samples with and stays the default; DPM-Solver++ 2M is the recommended fast setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from .validation import InputError


@dataclass(frozen=True)
class SchedulerChoice:
    """One entry of :data:`SCHEDULERS`: the diffusers class, the options it is built with, its step count."""

    label: str
    diffusers_class: str  # a class name in the ``diffusers`` package
    steps: int  # the steps it is meant to run: the default's default, the others' recommendation
    description: str
    # Config options on top of the model's own schedule (read-only: the table is shared).
    options: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice(
        "DDIM", "DDIMScheduler", 50, "Deterministic DDIM (eta 0), the sampler of the released MVDiffusion",
    ),
    "dpm++2m": SchedulerChoice(
        "DPM++ 2M", "DPMSolverMultistepScheduler", 20,
        "DPM-Solver++ 2M, a second-order multistep solver made for few steps and strong guidance",
        MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ),
    "unipc": SchedulerChoice(
        "UniPC", "UniPCMultistepScheduler", 20, "UniPC, a multistep predictor-corrector solver made for few steps",
    ),
}
"""Scheduler name (as jobs, the command line and the add-on spell it) -> how to build and run it."""

DEFAULT_SCHEDULER = "ddim"
FAST_SCHEDULER = "dpm++2m"  # the recommended faster setting, at SCHEDULERS[FAST_SCHEDULER].steps
DEFAULT_STEPS = SCHEDULERS[DEFAULT_SCHEDULER].steps
DEFAULT_GUIDANCE = 9.0  # classifier-free guidance of the released MVDiffusion


def scheduler_name(field_name: str, value: object) -> str:
    """``value`` if it names a scheduler of :data:`SCHEDULERS`; otherwise InputError naming ``field_name``."""
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise InputError(field_name, f"must be one of {', '.join(SCHEDULERS)}, got {value!r}")
    return value


def scheduler_note(name: str) -> str:
    """The steps a scheduler is meant for, and whether it is the default or the recommended fast one."""
    steps = SCHEDULERS[name].steps
    if name == DEFAULT_SCHEDULER:
        return f"the default, {steps} steps"
    if name == FAST_SCHEDULER:
        return f"recommended fast setting, {steps} steps"
    return f"{steps} steps"


def scheduler_description(name: str) -> str:
    """A scheduler's tooltip: what it is, then :func:`scheduler_note`."""
    return f"{SCHEDULERS[name].description} ({scheduler_note(name)})"


def scheduler_summary() -> str:
    """Every scheduler with its note, on one line, for command-line help."""
    return "; ".join(f"{name} ({scheduler_note(name)})" for name in SCHEDULERS)


MODES = ("trained", "training_free", "independent")
"""How a job ties its views together: the trained multi-view blocks, the base model's own attention
with canvas synchronisation (no multi-view weights needed), or not at all. A job that names none
gets the best its backend has: ``trained`` where multi-view weights are loaded, else ``training_free``."""

MODE_NOTES = MappingProxyType({
    "trained": "the multi-view weights tie overlapping views together",
    "training_free": "the base model's own attention across views, and every step fused on one shared "
                     "texture or panorama canvas; needs no multi-view weights",
    "independent": "every view generated alone, as one-view-at-a-time texturing does; views will not agree",
})

DEFAULT_SYNC_START = 0.0
DEFAULT_SYNC_STOP = 1.0
"""Share of the denoising steps in which canvas synchronisation runs (training-free mode): all of
them. Stopping early leaves the last steps free to disagree again (docs/benchmarks.md)."""
DEFAULT_SYNC_SHARPNESS = 32.0
"""Power of the views' blend weights on the canvas, relative to each cell's best view. Plain
weights (1) average the views and blur their detail away; at 32 each cell mostly follows the view
that sees it best, which keeps detail and prompt colours (docs/benchmarks.md)."""
