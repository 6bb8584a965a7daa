"""Benchmarks: ``python -m backend bench NAME [--json]``.

Each benchmark prints a readable summary, and with ``--json`` one JSON object on its last line
so scripts and docs/benchmarks.md can take the figures as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable

from .sampling_options import DEFAULT_SYNC_START, DEFAULT_SYNC_STOP

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {}
DEFAULT_VIEW_SIZE = (256, 192)


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn

    return register


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def machine() -> dict:
    """Where a figure came from, so a number in the docs can be traced to its hardware."""
    import torch

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@benchmark("bake")
def bench_bake(args: argparse.Namespace) -> dict:
    """Bake the demo room's ground truth from rendered views; PSNR at held-out poses."""
    from .eval.bake_roundtrip import bake_roundtrip
    from .geometry.bake import BakeSettings

    views = args.views or 24
    if args.mode not in (None, "blend", "best"):
        from .validation import InputError

        raise InputError("mode", f"bake blends with 'blend' or 'best', got {args.mode!r}")
    args.mode = args.mode or "blend"
    run = bake_roundtrip(args.size, views, args.heldout, args.width, args.height, BakeSettings(mode=args.mode))
    return {
        "benchmark": "bake",
        "psnr_db": round(run.psnr_db, 3),
        "psnr_min_view_db": round(min(run.psnr_per_view), 3),
        "coverage": round(run.coverage, 5),
        "bake_seconds": round(run.seconds["bake"], 3),
        "atlas_seconds": round(run.seconds["atlas"], 3),
        "render_seconds": round(run.seconds["render"], 3),
        "texture_size": args.size,
        "views": views,
        "heldout_views": len(run.heldout),
        "view_size": [args.width, args.height],
        "mode": args.mode,
        "triangles": int(len(run.room.atlas.mesh.triangles)),
        "seen_share": round(float(run.result.seen.sum() / run.room.surface.covered.sum()), 4),
        "machine": machine(),
    }


@benchmark("panorama")
def bench_panorama(args: argparse.Namespace) -> dict:
    """Cut a known equirect into the panorama layout (poles included) and stitch it back."""
    import time

    from .eval.image_metrics import psnr
    from .eval.panorama_metrics import seam_discontinuity
    from .geometry.equirect import equirect_directions, equirect_to_perspective, stitch_equirect
    from .geometry.panorama import panorama_layout
    from .scenes.sky import sphere_pattern

    height = args.size // 2
    truth = sphere_pattern(equirect_directions(height, args.size))
    cameras = panorama_layout(size=args.view_size)
    start = time.perf_counter()
    views = [equirect_to_perspective(truth, camera) for camera in cameras]
    cut_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stitched, weight = stitch_equirect(views, cameras, height=height)
    stitch_seconds = time.perf_counter() - start
    return {
        "benchmark": "panorama",
        "psnr_db": round(psnr(truth, stitched), 3),
        "seam_score": round(seam_discontinuity(stitched).score, 5),
        "seam_score_truth": round(seam_discontinuity(truth).score, 5),
        "covered": round(float((weight > 0).mean()), 6),
        "stitch_seconds": round(stitch_seconds, 3),
        "cut_seconds": round(cut_seconds, 3),
        "views": len(cameras),
        "view_size": args.view_size,
        "equirect": [args.size, height],
        "machine": machine(),
    }


@benchmark("unet")
def bench_unet(args: argparse.Namespace) -> dict:
    """One multi-view UNet step (all views, both guidance halves) with and without CAA."""
    from .models.benchmark import run_unet_benchmark
    from .models.sd2_configs import SD2_CHANNELS

    channels = SD2_CHANNELS if args.channels == "sd2" else tuple(int(c) for c in args.channels.split(","))
    dtype = torch_dtype(args.dtype)
    scaling = tuple(int(v) for v in args.scaling.split(",")) if args.scaling else ()
    size = (args.width, args.height) if args.size_given else None
    if args.mode == "training_free":
        from .models.training_free_bench import run_training_free_benchmark

        result = run_training_free_benchmark(args.views or 8, channels, args.neighbours, args.repeats, args.device,
                                             dtype, size)
        result["machine"] = machine()
        return result
    result = run_unet_benchmark(
        args.task, args.views or 8, channels, args.neighbours, args.repeats, args.device, dtype, scaling, size
    )
    result["machine"] = machine()
    return result


@benchmark("caa")
def bench_caa(args: argparse.Namespace) -> dict:
    """One CAA block of each released design at each SD 2 level, ours against the literal per-token form."""
    from .models.caa_bench import run_caa_benchmark

    dtype = torch_dtype(args.dtype)
    result = run_caa_benchmark(repeats=args.repeats, threads=args.threads, device=args.device, dtype=dtype)
    result["machine"] = machine()
    return result


@benchmark("precision")
def bench_precision(args: argparse.Namespace) -> dict:
    """The CAA block in float32, float16 and bfloat16 against float64, and a plain attention's floor."""
    from .models.caa_bench import run_precision_benchmark

    result = run_precision_benchmark(device=args.device)
    result["machine"] = machine()
    return result


@benchmark("job")
def bench_job(args: argparse.Namespace) -> dict:
    """A whole texturing job of the demo room over HTTP on the tiny models, per stage."""
    from .server.bench_job import run_job_benchmark

    result = run_job_benchmark(args.views or 12, args.width, args.height, args.steps or 10, args.size)
    result["machine"] = machine()
    return result


@benchmark("unwrap")
def bench_unwrap(args: argparse.Namespace) -> dict:
    """Unwrap an icosphere (20 * 4^subdivisions triangles) in the child process: time, memory, caller stalls."""
    from .geometry.unwrap_bench import run_unwrap_benchmark

    result = run_unwrap_benchmark(args.subdivisions, args.size)
    result["machine"] = machine()
    return result


@benchmark("consistency")
def bench_consistency(args: argparse.Namespace) -> dict:
    """Train the tiny recipe (or load --run), generate held-out trajectories with and without CAA, score overlap."""
    from .sampling_options import DEFAULT_STEPS
    from .train.config import TrainConfig
    from .train.consistency_bench import DEFAULT_CONFIG, TINY_GUIDANCE, run_consistency_benchmark

    config = TrainConfig.load(args.config) if args.config else None
    if config is None and not args.run:
        config = TrainConfig.load(DEFAULT_CONFIG)
    result = run_consistency_benchmark(
        config, args.run or args.out, train=not args.run, trajectories=args.heldout,
        steps=args.steps or DEFAULT_STEPS, guidance=TINY_GUIDANCE if args.guidance is None else args.guidance,
        progress=not args.json, sync_range=(args.sync_start, args.sync_stop), panorama=args.panoramas,
    )
    result["machine"] = machine()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--size", type=int, default=1024, help="texture size (bake), equirect width (panorama)")
    parser.add_argument("--view-size", type=int, default=512, help="panorama view size in pixels (panorama)")
    parser.add_argument("--views", type=int, default=None, help="number of views (bake: 24, unet: 8, job: 12 frames)")
    parser.add_argument("--heldout", type=int, default=8,
                        help="held-out poses for PSNR (bake), held-out trajectories (consistency)")
    parser.add_argument("--width", type=int, default=None,
                        help="view width in pixels (default 256; unet: the task's released size, 512 or 256)")
    parser.add_argument("--height", type=int, default=None,
                        help="view height in pixels (default 192; unet: the task's released size, 512 or 192)")
    parser.add_argument("--mode", choices=("blend", "best", "trained", "training_free"), default=None,
                        help="bake blending: blend (default) or best (bake); trained (default) or training_free "
                             "multi-view step (unet)")
    parser.add_argument("--channels", default="64,128,256,256", help="UNet block channels, or 'sd2' (unet)")
    parser.add_argument("--neighbours", type=int, default=4, help="CAA neighbours per view (unet, depth task)")
    parser.add_argument("--task", choices=("panorama", "depth"), default="panorama", help="CAA design (unet)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, interleaved (unet, caa)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (caa)")
    parser.add_argument("--device", default="auto",
                        help="torch device; auto: cuda when available (unet, caa, precision)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="working dtype (unet, caa)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (job: 10, consistency: 50)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (consistency: 3)")
    parser.add_argument("--config", help="training recipe (consistency; default backend/train/recipes/tiny_depth.json)")
    parser.add_argument("--run", help="evaluate this finished run folder instead of training (consistency)")
    parser.add_argument("--out", help="keep the run trained by the benchmark in this folder (consistency)")
    parser.add_argument("--subdivisions", type=int, default=6,
                        help="icosphere subdivisions (unwrap: 6 is 82k triangles, 8 is 1.3 M)")
    parser.add_argument("--sync-start", type=float, default=DEFAULT_SYNC_START,
                        help="share of the steps where canvas synchronisation starts (consistency, unet)")
    parser.add_argument("--sync-stop", type=float, default=DEFAULT_SYNC_STOP,
                        help="share of the steps where canvas synchronisation stops (consistency, unet)")
    parser.add_argument("--panoramas", type=int, default=2, help="held-out panoramas of the panorama row (consistency)")
    parser.add_argument("--scaling", default="", help="view counts for the memory-scaling rows, e.g. 12,48,192")


def run(args: argparse.Namespace) -> int:
    # --width/--height default to the ScanNet-like view; ``unet`` takes each task's own size instead.
    args.size_given = args.width is not None or args.height is not None
    args.width = DEFAULT_VIEW_SIZE[0] if args.width is None else args.width
    args.height = DEFAULT_VIEW_SIZE[1] if args.height is None else args.height
    if args.device == "auto":
        from .engine import resolve_device

        args.device = resolve_device(args.device)
    result = BENCHMARKS[args.name](args)
    for key, value in result.items():
        if key not in ("machine", "cases"):
            print(f"{key:>20}: {value}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0
