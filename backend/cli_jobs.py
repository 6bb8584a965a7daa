"""Commands that run whole jobs: ``serve``, ``texture JOB.npz --out DIR``, ``panorama --prompt ...``.

``texture`` and ``panorama`` run in this process (no server needed) with a progress bar per
stage; ``serve`` starts the HTTP backend that Blender and remote clients talk to.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path

from .sampling_options import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, MODES, SCHEDULERS, scheduler_summary
from .validation import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .models.catalog import BASE_KINDS, DEFAULT_BASE_KIND
    from .models.serving import DEFAULT_BASE_MODEL, DEFAULT_DEPTH_MODEL, DEFAULT_INPAINT_MODEL

    group = parser.add_argument_group("models")
    group.add_argument("--models", help="'tiny' (random test weights) or a folder holding depth/ and base/")
    group.add_argument("--depth-model", default=DEFAULT_DEPTH_MODEL, help="SD 2 depth: hub id, folder or file")
    group.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="SD 2 base: hub id, folder or file")
    group.add_argument("--depth-caa", help="multi-view block weights for the depth model (.safetensors or .ckpt)")
    group.add_argument("--panorama-caa", help="multi-view block weights for the panorama model")
    group.add_argument("--inpaint-model", default=DEFAULT_INPAINT_MODEL,
                       help="SD 2 inpainting (panoramas from an image): hub id, folder or file")
    group.add_argument("--outpaint-caa", help="multi-view block weights for the inpainting model")
    group.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda when available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: float16 on a GPU")
    group.add_argument("--offline", action="store_true", help="never contact the model hub")
    group.add_argument("--models-dir", help="models folder (default: $MVDIFF_MODELS_DIR or the user data folder)")
    kinds = ", ".join(f"{kind} ({family.label})" for kind, family in BASE_KINDS.items())
    group.add_argument("--base-kind", choices=tuple(BASE_KINDS), default=DEFAULT_BASE_KIND,
                       help=f"the base model family: {kinds}. Default: {DEFAULT_BASE_KIND}")
    group.add_argument("--model", help="SD 1.5 / SDXL model of a ControlNet kind: hub id, folder, .safetensors/.ckpt "
                                       "file, or 'tiny' (default: the kind's catalog model)")
    group.add_argument("--controlnet", help="its depth ControlNet: hub id, folder or file (default: the catalog's)")
    group.add_argument("--model-config", help="configs for a single-file --model: diffusers folder or hub id")
    group.add_argument("--controlnet-config", help="config for a single-file --controlnet: folder or hub id")


def model_config(args: argparse.Namespace):
    from .models.serving import AUTO, ModelConfig

    if args.models == "tiny":
        return ModelConfig.tiny(args.base_kind)
    return ModelConfig(
        depth=args.depth_model, base=args.base_model, root=args.models, depth_caa=args.depth_caa,
        panorama_caa=args.panorama_caa, inpaint=args.inpaint_model, outpaint_caa=args.outpaint_caa,
        device=args.device or AUTO, dtype=args.dtype or AUTO,
        offline=True if args.offline else None, models_dir=args.models_dir, base_kind=args.base_kind,
        model=args.model, controlnet=args.controlnet, model_config=args.model_config,
        controlnet_config=args.controlnet_config,
    )


# ---------------------------------------------------------------------- serve
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .server.config import DEFAULT_PORT, DEFAULT_STORE, DEFAULT_UPLOAD_TIMEOUT, TOKEN_ENV, JobLimits, Retention

    limits, retention = JobLimits(), Retention()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (off loopback needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token-file", help=f"file whose first line is the access token (default: ${TOKEN_ENV}; "
                                             "the token is never taken from the command line, where ps shows it)")
    parser.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    parser.add_argument("--public-name", action="append", default=[],
                        help="another host name this server answers to (a reverse proxy's name); repeatable")
    parser.add_argument("--store", default=str(DEFAULT_STORE), help="job store folder")
    parser.add_argument("--max-body-mb", type=float, default=512.0, help="largest job upload (default: 512)")
    parser.add_argument("--upload-timeout", type=float, default=DEFAULT_UPLOAD_TIMEOUT,
                        help="seconds an upload may take, and a tenth of it without a byte (default: %(default)s)")
    group = parser.add_argument_group("job limits (a job over one is refused at submission)")
    group.add_argument("--max-views", type=int, default=limits.max_views, help="default: %(default)s")
    group.add_argument("--max-view-pixels", type=int, default=limits.max_view_pixels,
                       help="pixels of one view (default: %(default)s)")
    group.add_argument("--max-texture-size", type=int, default=limits.max_texture_size, help="default: %(default)s")
    group.add_argument("--max-triangles", type=int, default=limits.max_triangles, help="default: %(default)s")
    group.add_argument("--max-objects", type=int, default=limits.max_objects, help="default: %(default)s")
    group.add_argument("--max-job-gb", type=float, default=limits.max_job_bytes / 2**30,
                       help="estimated host memory of one job (default: %(default)s)")
    group = parser.add_argument_group("retention of finished jobs")
    group.add_argument("--keep-days", type=float, default=retention.keep_days,
                       help="delete finished jobs older than this (default: %(default)s; 0 keeps them)")
    group.add_argument("--keep-jobs", type=int, default=retention.keep_jobs,
                       help="keep at most this many finished jobs (default: %(default)s; 0 keeps all)")
    add_model_arguments(parser)


class _RefuseToken(argparse.Action):
    """``--token VALUE`` would show the token to every user of the machine (``ps``): refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .server.config import TOKEN_ENV

        parser.error(f"--token is not accepted on the command line (other users see it in ps); "
                     f"put the token in a file and pass --token-file FILE, or set ${TOKEN_ENV}")


def run_serve(args: argparse.Namespace) -> int:
    from .server.config import INSTANCE_ENV, JobLimits, Retention, ServerConfig, check_token, read_token

    token = read_token(args.token_file)
    check_token(token, args.host)  # before the models (and torch) load: a bad token fails at once
    from .server.serve import serve

    limit = int(args.max_body_mb * 2**20)
    limits = JobLimits(max_views=args.max_views, max_view_pixels=args.max_view_pixels,
                       max_texture_size=args.max_texture_size, max_triangles=args.max_triangles,
                       max_vertices=max(args.max_triangles, JobLimits().max_vertices), max_objects=args.max_objects,
                       max_job_bytes=int(args.max_job_gb * 2**30))
    retention = Retention(keep_days=args.keep_days or None, keep_jobs=args.keep_jobs or None)
    timeout = args.upload_timeout
    config = ServerConfig(host=args.host, port=args.port, token=token, store=Path(args.store),
                          max_body_bytes=limit, max_unpacked_bytes=4 * limit, upload_timeout=timeout,
                          upload_idle_timeout=min(timeout, max(1.0, timeout / 10)),
                          public_names=tuple(args.public_name),
                          instance_id=os.environ.get(INSTANCE_ENV) or uuid.uuid4().hex,
                          limits=limits, retention=retention, models=model_config(args))
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
    parser.add_argument("--view-size", type=int,
                        help="size of each generated view (default: the base model's native size, 512 or 1024)")
    parser.add_argument("--image", help="a photo or render the 360 environment is made around (its front view)")
    parser.add_argument("--out", required=True, help="output folder")
    add_mode_argument(parser)
    add_model_arguments(parser)


def run_panorama(args: argparse.Namespace) -> int:
    from .protocol import GenerationSettings, PanoramaJob, read_job

    settings = GenerationSettings(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed,
                                  args.scheduler, args.mode)
    image = None
    if args.image is not None:
        import imageio.v3 as iio
        import numpy as np

        if not Path(args.image).is_file():
            raise InputError("image", f"no such file: {args.image}")
        image = iio.imread(args.image)
        image = image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
        if image.dtype != np.uint8:
            raise InputError("image", f"{args.image} must be an 8-bit image, got {image.dtype}")
    job = read_job(PanoramaJob(settings, args.height, args.view_size, image).to_bytes())  # validated like a sent job
    return _run_local(job, args)
