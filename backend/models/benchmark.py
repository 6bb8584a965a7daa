"""Speed and memory of one multi-view UNet step with and without CAA (``bench unet``).

The step is the one a pipeline runs: all views and both classifier-free guidance halves in one
batch, at the image size each released design runs at (:data:`TASK_IMAGE_SIZE`). Two tasks:

* ``panorama``: views of the 8-view ring, 45 degrees apart at 512 x 512 (latents 64 x 64), each
  attending to 3 x 3 neighbourhoods in its ring neighbours (18 key tokens per pixel, the released
  panorama design). Fewer views are the first views of that ring, so each keeps its overlaps.
* ``depth``: views along the demo room's loop at 192 x 256 (latents 24 x 32), each attending to
  its best-overlapping neighbours, every CAA block followed by the depth task's
  zero-initialised ResNet.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ..geometry.cameras import Camera, yaw_pitch_rotation
from ..geometry.correspondence import overlap_matrix
from ..geometry.render import render_depth
from ..scenes.demo_room import build_demo_room, trajectory
from .caa_geometry import depth_geometry, panorama_geometry
from .loading import KIND_IN_CHANNELS
from .mv_unet import MultiViewUNet
from .sd2_configs import SD2_CHANNELS, SD2_UNET, random_unet, unet_config

SMALL_CHANNELS = (64, 128, 256, 256)
TASK_IMAGE_SIZE = {"panorama": (512, 512), "depth": (256, 192)}
"""(width, height) of the views each released design generates: MVDiffusion's panorama and ScanNet sizes."""
PANORAMA_RING = 8


def sd2_structured_unet(channels: tuple[int, ...], in_channels: int = 5, cross_dim: int | None = None):
    """SD 2's UNet layout (four levels, cross attention on the first three, 2 layers per block).

    At SD 2's own widths this is the real config (:mod:`.sd2_configs`) with random weights; other
    widths keep the layout, 64-channel heads and a text context as wide as the first level.
    """
    kind = next(k for k, c in KIND_IN_CHANNELS.items() if c == in_channels)
    if tuple(channels) == SD2_CHANNELS and cross_dim in (None, SD2_UNET["cross_attention_dim"]):
        return random_unet(kind)
    config = {
        **unet_config(kind),
        "block_out_channels": tuple(channels),
        "attention_head_dim": tuple(max(1, c // 64) for c in channels),
        "cross_attention_dim": cross_dim or channels[0],
    }
    return UNet2DConditionModel(**config).eval()


def trajectory_neighbours(count: int, neighbours: int, width: int = 256, height: int = 192):
    """Consecutive cameras along the demo loop, their depths, and each view's best neighbours.

    Views are spaced as keyframes are (a 24-view loop's neighbours overlap by about half), so
    the neighbours really share pixels; fewer views are the start of that loop, not a sparser one.
    """
    room = build_demo_room()
    cameras = trajectory(max(count, 24), width=width, height=height)[:count]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    neighbours = min(neighbours, count - 1)
    if count <= 24:
        overlap = overlap_matrix(cameras, depths, stride=8)
        np.fill_diagonal(overlap, -1.0)
        graph = [list(np.argsort(-overlap[i])[:neighbours]) for i in range(count)]
    else:  # ring neighbours keep the all-pairs overlap out of long benchmarks
        half = neighbours // 2
        graph = [[(i + d) % count for d in range(-half, neighbours - half + 1) if d != 0][:neighbours]
                 for i in range(count)]
    return cameras, depths, [[int(j) for j in row] for row in graph]


def ring_cameras(count: int, width: int = 256, height: int = 192) -> list[Camera]:
    """Panorama views turning right by 360 / count degrees, FOV 90 horizontally."""
    cameras = []
    for k in range(count):
        pose = np.eye(4)
        pose[:3, :3] = yaw_pitch_rotation(360.0 / count * k, 0.0)
        cameras.append(Camera.from_fov(90.0, width, height, pose))
    return cameras


def ring_views(count: int, width: int, height: int) -> tuple[list[Camera], list[list[int]]]:
    """The first ``count`` views of the 8-view ring and their ring neighbours among them.

    All eight have two neighbours; with fewer, the two ends of the arc have one.
    """
    ring = max(PANORAMA_RING, count)
    cameras = ring_cameras(ring, width, height)[:count]
    graph = [[j for j in ((i - 1) % ring, (i + 1) % ring) if j < count and j != i] for i in range(count)]
    return cameras, [sorted(set(row), key=row.index) for row in graph]


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory allocated by ``fn`` above the level at its start, in MB.

    CUDA: the caching allocator's own peak. CPU: torch's allocations replayed in time order from
    the profiler's memory events (the resident set is useless here: freed blocks stay mapped).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def time_steps(model: MultiViewUNet, sample, text, geometry, repeats: int, device: torch.device):
    """Seconds of one UNet call without and with CAA, interleaved so machine noise hits both alike.

    Returns the medians of both and the median of the per-pair ratios (the overhead).
    """
    def call(with_geometry):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(sample, 500, text, geometry if with_geometry else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        call(False), call(True)
        pairs = [(call(False), call(True)) for _ in range(repeats)]
    plain, caa = [p for p, _ in pairs], [c for _, c in pairs]
    return statistics.median(plain), statistics.median(caa), statistics.median(c / p for p, c in pairs)


def step_memory(model: MultiViewUNet, sample, text, geometry, device: torch.device) -> float:
    """Peak memory of one step in a running job: the per-job geometry caches already exist."""
    with torch.no_grad():
        model(sample, 500, text, geometry)
        return peak_memory_mb(lambda: model(sample, 500, text, geometry), device)


def block_memory(model: MultiViewUNet, geometry: dict, batch: int, device: torch.device, dtype) -> float:
    """Peak memory of the first (widest) CAA block alone, above its input: what CAA itself holds.

    Inside a whole step that peak hides under the UNet's own, so it is measured apart.
    """
    block = model.caa_down[0]
    level = max(geometry.values(), key=lambda g: g.height * g.width)
    hidden = torch.randn(batch, block.attention.dim, level.height, level.width, device=device, dtype=dtype)
    with torch.no_grad():
        block(hidden, level)  # the per-job caches exist in a running job
        return peak_memory_mb(lambda: block(hidden, level), device)


def run_unet_benchmark(
    task: str = "panorama",
    views: int = 8,
    channels: tuple[int, ...] = SMALL_CHANNELS,
    neighbours: int = 4,
    repeats: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling: tuple[int, ...] = (),
    image_size: tuple[int, int] | None = None,
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    in_channels = 4 if task == "panorama" else 5
    width, height = image_size or TASK_IMAGE_SIZE[task]
    unet = sd2_structured_unet(channels, in_channels).to(dev)
    model = MultiViewUNet(unet, task).to(dev, dtype)  # casts the wrapped UNet too
    cross_dim = unet.config.cross_attention_dim

    def batch(count: int):
        if task == "panorama":
            cameras, graph = ring_views(count, width, height)
            geometry = panorama_geometry(cameras, graph)
        else:
            cameras, depths, graph = trajectory_neighbours(count, neighbours, width, height)
            geometry = depth_geometry(cameras, depths, graph)
        geometry = {k: v.to(dev, dtype) for k, v in geometry.items()}
        latent = (height // 8, width // 8)
        sample = torch.randn(2 * count, in_channels, *latent, device=dev, dtype=dtype)  # both guidance halves
        text = torch.randn(2 * count, 77, cross_dim, device=dev, dtype=dtype)
        return sample, text, geometry, graph

    sample, text, geometry, graph = batch(views)
    with torch.no_grad():
        plain_out = model(sample, 500, text)
        caa_out = model(sample, 500, text, geometry)
    zero_diff = float((plain_out - caa_out).abs().max())
    plain_seconds, caa_seconds, overhead = time_steps(model, sample, text, geometry, repeats, dev)
    result = {
        "benchmark": "unet",
        "caa_overhead": round(overhead, 4),
        "step_seconds_caa": round(caa_seconds, 4),
        "step_seconds_plain": round(plain_seconds, 4),
        "peak_mem_mb_caa": round(step_memory(model, sample, text, geometry, dev), 1),
        "peak_mem_mb_plain": round(step_memory(model, sample, text, None, dev), 1),
        "zero_caa_max_abs_diff": zero_diff,
        "views": views,
        "batch": 2 * views,
        "neighbours": max(len(row) for row in graph),
        "key_tokens": int(next(iter(geometry.values())).num_tokens),
        # Tokens left per pixel once those without a valid correspondence are dropped (largest level).
        "key_tokens_attended": int(next(iter(geometry.values())).key_tokens(drop_invalid=True).count),
        "config": {"channels": list(channels), "latent": [height // 8, width // 8], "task": task, "cfg": True,
                   "dtype": str(dtype).replace("torch.", ""), "device": device},
        "caa_parameters_m": round(sum(p.numel() for p in model.added_state_dict().values()) / 1e6, 2),
    }
    if scaling:
        rows = []
        for count in scaling:
            sample, text, geometry, _ = batch(count)
            geometry_mb = sum(
                t.numel() * t.element_size() for g in geometry.values()
                for t in (g.source_view, g.grid, g.valid, g.encoding_input)
            ) / 2**20
            rows.append({
                "views": count,
                "peak_mem_mb_caa": round(step_memory(model, sample, text, geometry, dev), 1),
                "peak_mem_mb_plain": round(step_memory(model, sample, text, None, dev), 1),
                "caa_block_peak_mb": round(block_memory(model, geometry, 2 * count, dev, dtype), 1),
                "geometry_mb": round(geometry_mb, 2),
            })
        result["scaling"] = rows
    return result
