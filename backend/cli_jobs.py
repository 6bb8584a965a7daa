"""Commands that run whole jobs: ``serve``, ``texture JOB.npz --out DIR``, ``panorama --prompt ...``.

``texture`` and ``panorama`` run in this process (no server needed) with a progress bar per
stage; ``serve`` starts the HTTP backend that Blender and remote clients talk to.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .sampling_options import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, MODES, SCHEDULERS, scheduler_summary
from .validation import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .engine import DEFAULT_BASE_MODEL, DEFAULT_DEPTH_MODEL

    group = parser.add_argument_group("models")
    group.add_argument("--models", help="'tiny' (random test weights) or a folder holding depth/ and base/")
    group.add_argument("--depth-model", default=DEFAULT_DEPTH_MODEL, help="SD 2 depth: hub id, folder or file")
    group.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="SD 2 base: hub id, folder or file")
    group.add_argument("--depth-caa", help="multi-view block weights for the depth model (.safetensors or .ckpt)")
    group.add_argument("--panorama-caa", help="multi-view block weights for the panorama model")
    group.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda when available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: float16 on a GPU")
    group.add_argument("--offline", action="store_true", help="never contact the model hub")
    group.add_argument("--models-dir", help="models folder (default: $MVDIFF_MODELS_DIR or the user data folder)")


def model_config(args: argparse.Namespace):
    from .engine import ModelConfig

    if args.models == "tiny":
        return ModelConfig.tiny()
    defaults = ModelConfig()
    return ModelConfig(
        depth=args.depth_model, base=args.base_model, root=args.models, depth_caa=args.depth_caa,
        panorama_caa=args.panorama_caa, device=args.device or defaults.device, dtype=args.dtype or defaults.dtype,
        offline=True if args.offline else None, models_dir=args.models_dir,
    )


# ---------------------------------------------------------------------- serve
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .server.config import DEFAULT_PORT, DEFAULT_STORE, TOKEN_ENV

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (off loopback needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default: ${TOKEN_ENV})")
    parser.add_argument("--store", default=str(DEFAULT_STORE), help="job store folder")
    parser.add_argument("--max-body-mb", type=float, default=512.0, help="largest job upload")
    add_model_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from .server.config import ServerConfig
    from .server.serve import serve

    limit = int(args.max_body_mb * 2**20)
    config = ServerConfig(host=args.host, port=args.port, token=args.token or None, store=Path(args.store),
                          max_body_bytes=limit, max_unpacked_bytes=4 * limit, models=model_config(args))
    serve(config.validated())
    return 0


# ---------------------------------------------------------------------- local jobs
class StageBars:
    """One tqdm bar per stage, replaced when the stage changes."""

    def __init__(self) -> None:
        self.bar = None
        self.stage: str | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=max(total, 1), desc=stage, unit="step", dynamic_ncols=True)
        if self.bar is not None:
            self.bar.total = max(total, 1)
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_local(job, args: argparse.Namespace) -> int:
    from .engine import ModelSet
    from .pipelines.context import JobContext
    from .server.worker import run_job

    bars = StageBars()
    ctx = JobContext(Path(args.out), on_progress=bars)
    try:
        report = run_job(job, ModelSet(model_config(args)), ctx)
    finally:
        bars.close()
    print(json.dumps({k: v for k, v in report.items() if k in ("kind", "seconds")}, indent=1))
    print(f"Results in {args.out}")
    return 0


def add_scheduler_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--scheduler``: every name with its steps, the default and the fast setting marked."""
    what = "denoising scheduler" if default else "denoising scheduler instead of the job's own"
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=default,
                        help=f"{what}: {scheduler_summary()}")


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """``--mode``: how views are tied together; without it the job's own, else the best available."""
    parser.add_argument("--mode", choices=list(MODES),
                        help="trained: the multi-view weights; training_free: the base model's own attention "
                             "and canvas synchronisation; independent: every view alone "
                             "(default: the job's own, else trained when multi-view weights are loaded, "
                             "else training_free)")


def add_texture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="a texture job .npz (the wire format Blender writes)")
    parser.add_argument("--out", required=True, help="output folder")
    add_scheduler_argument(parser, None)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the job's own)")
    add_mode_argument(parser)
    add_model_arguments(parser)


def run_texture(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .protocol import read_job

    path = Path(args.job)
    if not path.is_file():
        raise InputError("job", f"no such file: {path}")
    job = read_job(path.read_bytes())
    if job.kind != "texture":
        raise InputError("kind", f"{path} holds a {job.kind} job; use the panorama command for it")
    given = (("scheduler", args.scheduler), ("steps", args.steps), ("mode", args.mode))
    overrides = {name: value for name, value in given if value is not None}
    if overrides:
        job.settings = replace(job.settings, **overrides).validate()
    return _run_local(job, args)


def add_panorama_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True,
                        help="text prompt; repeat once per view for per-view prompts")
    parser.add_argument("--negative-prompt", default="")
    add_scheduler_argument(parser, DEFAULT_SCHEDULER)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=1024, help="equirect height (width is twice that)")
    parser.add_argument("--view-size", type=int, default=512, help="size of each generated view")
    parser.add_argument("--out", required=True, help="output folder")
    add_mode_argument(parser)
    add_model_arguments(parser)


def run_panorama(args: argparse.Namespace) -> int:
    from .protocol import GenerationSettings, PanoramaJob, read_job

    settings = GenerationSettings(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed,
                                  args.scheduler, args.mode)
    job = read_job(PanoramaJob(settings, args.height, args.view_size).to_bytes())  # validated like a sent job
    return _run_local(job, args)
