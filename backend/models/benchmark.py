"""Speed and memory of one multi-view UNet step with and without CAA (``bench unet``).

The step is the one a pipeline runs: all views of a trajectory and both classifier-free
guidance halves in one batch, depth task (5 input channels, CAA followed by its ResNet) at the
ScanNet-like 192 x 256 image size, neighbours from the views' real overlap on the demo room.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ..geometry.correspondence import overlap_matrix
from ..geometry.render import render_depth
from ..scenes.demo_room import build_demo_room, trajectory
from .caa_geometry import depth_geometry
from .mv_unet import MultiViewUNet

SMALL_CHANNELS = (64, 128, 256, 256)
SD2_CHANNELS = (320, 640, 1280, 1280)


@dataclass
class StepTiming:
    seconds: float
    peak_mb: float


def sd2_structured_unet(channels: tuple[int, ...], in_channels: int = 5, cross_dim: int | None = None):
    """SD 2's UNet layout (four levels, cross attention on the first three, 2 layers per block)."""
    if cross_dim is None:
        cross_dim = 1024 if channels == SD2_CHANNELS else channels[0]
    head_dims = tuple(max(1, c // 64) for c in channels)
    return UNet2DConditionModel(
        sample_size=64, in_channels=in_channels, out_channels=4, block_out_channels=channels,
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=cross_dim,
        attention_head_dim=head_dims, use_linear_projection=True, norm_num_groups=32,
    ).eval()


def trajectory_neighbours(count: int, neighbours: int, width: int = 256, height: int = 192):
    """Cameras along the demo loop, their depths, and each view's best-overlapping neighbours."""
    room = build_demo_room()
    cameras = trajectory(count, width=width, height=height)
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    if count <= 24:
        overlap = overlap_matrix(cameras, depths, stride=8)
        np.fill_diagonal(overlap, -1.0)
        graph = [list(np.argsort(-overlap[i])[:neighbours]) for i in range(count)]
    else:  # ring neighbours keep the all-pairs overlap out of long benchmarks
        half = neighbours // 2
        graph = [[(i + d) % count for d in range(-half, neighbours - half + 1) if d != 0][:neighbours]
                 for i in range(count)]
    return cameras, depths, [[int(j) for j in row] for row in graph]


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory in MB above the level at entry (CUDA allocator, or resident set on Linux)."""
    box = {"mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield box
        torch.cuda.synchronize()
        box["mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    start = _rss_kb()
    _reset_peak_rss()
    yield box
    box["mb"] = (_peak_rss_kb() - start) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    return _status_kb("VmRSS:")


def _peak_rss_kb() -> int:
    return _status_kb("VmHWM:")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def time_step(model: MultiViewUNet, sample, text, geometry, repeats: int, device: torch.device) -> StepTiming:
    """Median seconds of one UNet call after a warm-up call, and the peak memory of one call."""
    with torch.no_grad():
        model(sample, 500, text, geometry)
        with peak_memory(device) as peak:
            model(sample, 500, text, geometry)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(sample, 500, text, geometry)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return StepTiming(statistics.median(times), peak["mb"])


def run_unet_benchmark(
    views: int = 8,
    channels: tuple[int, ...] = SMALL_CHANNELS,
    neighbours: int = 4,
    repeats: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling: tuple[int, ...] = (),
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    unet = sd2_structured_unet(channels).to(dev, dtype)
    model = MultiViewUNet(unet, "depth").to(dev, dtype)
    cross_dim = unet.config.cross_attention_dim

    def batch(count: int):
        cameras, depths, graph = trajectory_neighbours(count, neighbours)
        geometry = {k: v.to(dev, dtype) for k, v in depth_geometry(cameras, depths, graph).items()}
        sample = torch.randn(2 * count, 5, 24, 32, device=dev, dtype=dtype)  # both guidance halves
        text = torch.randn(2 * count, 77, cross_dim, device=dev, dtype=dtype)
        return sample, text, geometry

    sample, text, geometry = batch(views)
    with torch.no_grad():
        plain_out = model(sample, 500, text)
        caa_out = model(sample, 500, text, geometry)
    zero_diff = float((plain_out - caa_out).abs().max())
    plain = time_step(model, sample, text, None, repeats, dev)
    caa = time_step(model, sample, text, geometry, repeats, dev)
    result = {
        "benchmark": "unet",
        "caa_overhead": round(caa.seconds / plain.seconds, 4),
        "step_seconds_caa": round(caa.seconds, 4),
        "step_seconds_plain": round(plain.seconds, 4),
        "peak_mem_mb_caa": round(caa.peak_mb, 1),
        "peak_mem_mb_plain": round(plain.peak_mb, 1),
        "zero_caa_max_abs_diff": zero_diff,
        "views": views,
        "batch": 2 * views,
        "neighbours": neighbours,
        "config": {"channels": list(channels), "latent": [24, 32], "task": "depth", "cfg": True,
                   "dtype": str(dtype).replace("torch.", ""), "device": device},
        "caa_parameters_m": round(sum(p.numel() for p in model.added_state_dict().values()) / 1e6, 2),
    }
    if scaling:
        rows = []
        for count in scaling:
            sample, text, geometry = batch(count)
            geometry_mb = sum(
                t.numel() * t.element_size() for g in geometry.values()
                for t in (g.tap_index, g.tap_weight, g.valid, g.encoding_input)
            ) / 2**20
            plain = time_step(model, sample, text, None, 1, dev)
            caa = time_step(model, sample, text, geometry, 1, dev)
            rows.append({"views": count, "peak_mem_mb_caa": round(caa.peak_mb, 1),
                         "peak_mem_mb_plain": round(plain.peak_mb, 1), "geometry_mb": round(geometry_mb, 2),
                         "caa_overhead": round(caa.seconds / plain.seconds, 4)})
        result["scaling"] = rows
    return result
