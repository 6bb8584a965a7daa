"""One CAA block at every SD 2 level: speed against the literal form (``bench caa``) and precision.

``bench precision`` runs the block in float32, float16 and bfloat16 against float64.

Both run the two released designs on their own scenes:

* ``panorama``: 8 views of 512 x 512, 45 degrees apart, each reading 3 x 3 neighbourhoods in its
  two ring neighbours (18 tokens), released encodings and zero-vector keys;
* ``depth``: a 12-view loop through the demo room at 192 x 256, each view reading the views the
  released overlap rule gives it (3 to 6 here, so the level splits into groups by count),
  released encodings, zero-vector keys and the zero-initialised ResNet.

Every block has random weights at a trained-like scale (none at zero: a zero output projection
would hide the attention) and its input batch holds both guidance halves.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..geometry.render import render_depth
from ..scenes.demo_room import build_demo_room, trajectory
from .benchmark import ring_cameras
from .caa import CAABlock, CorrespondenceAttention
from .caa_geometry import depth_geometry, panorama_geometry, released_depth_neighbours, released_panorama_neighbours
from .caa_plan import plan_attention
from .caa_tokens import LevelGeometry, ViewGroups
from .literal_caa import literal_attention, literal_block, literal_transformer, view_tokens
from .released_encoding import ReleasedDepthEncoding, ReleasedPanoramaEncoding
from .sd2_configs import SD2_CHANNELS

DESIGNS = ("panorama", "depth")


@dataclass
class DesignScene:
    """A design's geometry per level (largest first) and its view count."""

    design: str
    views: int
    levels: list[LevelGeometry | ViewGroups]


def design_scene(design: str) -> DesignScene:
    """The released design's tokens for its scene (module docstring), one entry per SD 2 level."""
    if design == "panorama":
        cameras = ring_cameras(8, 512, 512)
        geometry = panorama_geometry(cameras, released_panorama_neighbours(len(cameras)), released=True)
    elif design == "depth":
        room = build_demo_room()
        cameras = trajectory(12, width=256, height=192)
        depths = [render_depth(room.mesh, camera) for camera in cameras]
        geometry = depth_geometry(cameras, depths, released_depth_neighbours(cameras, depths), released=True)
    else:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    levels = sorted(geometry.values(), key=lambda level: -level.height * level.width)
    return DesignScene(design, len(cameras), levels)


def random_block(design: str, dim: int, seed: int = 0, released: bool = True) -> CAABlock:
    """A CAA block of ``design`` with random weights whose activations stay O(1) at any width."""
    generator = torch.Generator().manual_seed(seed)
    block = CAABlock(dim, 2 if design == "panorama" else 1, design == "depth", mask_invalid=not released)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
            elif param.dim() > 1:
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if released:
        encoding = ReleasedPanoramaEncoding(dim) if design == "panorama" else ReleasedDepthEncoding(dim)
        block.attention.encoding = encoding
    return block.eval()


def _interleaved(calls: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each call, the calls taking turns so machine noise hits them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timings = [[] for _ in calls]
    with torch.no_grad():
        for call in calls:
            call()
        for _ in range(repeats):
            for k, call in enumerate(calls):
                sync()
                start = time.perf_counter()
                call()
                sync()
                timings[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in timings]


def _plan_label(block: CAABlock, level: LevelGeometry | ViewGroups, dtype: torch.dtype, device) -> str:
    """The forms the cost model picks for the level's buckets of queries (per sample, as the block chunks them)."""
    forms = set()
    for bucket in level.buckets(drop_invalid=block.attention.mask_invalid, dtype=dtype):
        plan = plan_attention(len(bucket.queries), bucket.tokens, block.attention.dim, block.attention.heads, dtype,
                              device)
        forms.add(plan.form + ("/fused" if plan.fused else ""))
    return "+".join(sorted(forms))


def run_caa_benchmark(
    repeats: int = 5, designs: tuple[str, ...] = DESIGNS, threads: int = 1, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """``bench caa``: each design's block at each SD 2 level, ours against the literal form, interleaved."""
    dev = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for design in designs:
            scene = design_scene(design)
            for level, dim in zip(scene.levels, SD2_CHANNELS, strict=True):
                block = random_block(design, dim, seed=dim).to(dev, dtype)
                level = level.to(dev, dtype)
                hidden = torch.randn(2 * scene.views, dim, level.height, level.width,
                                     generator=torch.Generator().manual_seed(1)).to(dev, dtype)
                with torch.no_grad():
                    ours_out = block(hidden, level)
                    literal_out = literal_block(block, hidden, level)
                calls = [partial(block, hidden, level), partial(literal_block, block, hidden, level)]
                ours, literal = _interleaved(calls, repeats, dev)
                rows.append({
                    "design": design,
                    "channels": dim,
                    "latent": [level.height, level.width],
                    "views": scene.views,
                    "groups": len(level.groups()),
                    "form": _plan_label(block, level, dtype, dev),
                    "ours_s": round(ours, 4),
                    "released_form_s": round(literal, 4),
                    "ratio": round(ours / literal, 4),
                    "max_abs_diff": float((ours_out - literal_out).abs().max()),
                })
    finally:
        torch.set_num_threads(previous)
    return {
        "benchmark": "caa",
        "levels": rows,
        "worst_ratio": max(row["ratio"] for row in rows),
        "threads": threads,
        "repeats": repeats,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
    }


# ------------------------------------------------------------------------------------------------------ precision
PRECISION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEY_RMS = (1.0, 10.0, 50.0, 200.0)


def _precision_geometry(design: str, size: int = 8, seed: int = 0) -> LevelGeometry:
    """Random tokens of a design on a small level: 3 views of ``size`` x ``size``, 70 % valid, a pixel with none."""
    generator = np.random.default_rng(seed)
    views, height, width = 3, size, size
    slots, samples, inputs = (2, 9, 2) if design == "panorama" else (4, 1, 1)
    pixels, tokens = height * width, slots * samples
    source = np.array([[(v + 1 + n) % views for n in range(slots)] for v in range(views)])
    coords = generator.uniform([-1.5, -1.5], [width + 0.5, height + 0.5], size=(views, slots, pixels, samples, 2))
    grid = np.empty(coords.shape, np.float32)
    grid[..., 0] = (2 * coords[..., 0] + 1) / width - 1
    grid[..., 1] = (2 * coords[..., 1] + 1) / height - 1
    valid = generator.random((views, pixels, tokens)) < 0.7
    valid[1, 7] = False
    values = generator.uniform(-1.0, 1.0, size=(views, pixels, tokens, inputs)).astype(np.float32)
    return LevelGeometry(height, width, torch.from_numpy(source), torch.from_numpy(grid),
                         torch.from_numpy(valid), torch.from_numpy(values))


def _floor(
    attention: CorrespondenceAttention, hidden64: torch.Tensor, level: LevelGeometry, dtype, update_only: bool,
    device: str = "cpu",
) -> torch.Tensor:
    """A plain attention in ``dtype`` on the same inputs: exact tokens rounded to ``dtype``, then
    LayerNorm, projections, ``scaled_dot_product_attention`` and feed-forward in ``dtype`` on ``device``."""
    views, channels, height, width = level.num_views, *hidden64.shape[1:]
    features = hidden64.view(-1, views, channels, height, width)
    zeros = level.encoding_input.new_zeros(height * width, 1, level.encoding_input.shape[-1])
    query_encoding = attention.encoding(zeros)[:, 0].to(device, dtype)
    low = _cast(attention, dtype).to(device)
    out = torch.empty_like(features, dtype=dtype)
    for view in range(views):
        keys, valid = view_tokens(attention, features, level, view)
        b = keys.shape[0]
        x = features[:, view].reshape(b, channels, -1).transpose(1, 2).reshape(-1, channels).to(device, dtype)
        keys = keys.reshape(-1, *keys.shape[2:]).to(device, dtype)
        y = literal_transformer(low, x, keys, valid.repeat(b, 1).to(device), query_encoding.repeat(b, 1),
                                fused=True, update_only=update_only).cpu()
        out[:, view] = y.view(b, -1, channels).transpose(1, 2).reshape(b, channels, height, width)
    return out.view_as(hidden64)


def _cast(attention: CorrespondenceAttention, dtype) -> CorrespondenceAttention:
    return copy.deepcopy(attention).to(dtype)


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(value.double() - reference) / torch.linalg.vector_norm(reference))


def common_inputs(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` rounded to values that float16 and bfloat16 both hold exactly, so one float64
    reference serves every dtype (bfloat16's 8 mantissa bits fit in float16's 11)."""
    rounded = hidden.to(torch.bfloat16).to(torch.float16).double()
    exact = rounded.to(torch.bfloat16).double() == rounded
    return torch.where(exact, rounded, torch.zeros_like(rounded))


def run_precision_benchmark(
    dims: tuple[int, ...] = (320, 1280), key_rms: tuple[float, ...] = KEY_RMS, designs: tuple[str, ...] = DESIGNS,
    dtypes: tuple[torch.dtype, ...] = PRECISION_DTYPES, size: int = 8, device: str = "cpu",
) -> dict:
    """``bench precision``: our block in each dtype and a plain attention in it, against float64.

    Two errors per case, both relative L2 norms against the float64 literal form on the same
    inputs: ``rel_err`` of the attention's update (what CAA adds to each pixel, before the
    residual: the part this block computes differently from a plain attention), and
    ``block_rel_err`` of the whole block's change to its input (output minus input, which at
    large feature scales is dominated by rounding the output to the working dtype). ``floor_*``
    are the same for a plain attention in the working dtype. Each feature scale is one pair of
    samples (both guidance halves) of one batch; samples never mix, so errors are per scale.
    """
    cases, finite = [], True
    for design in designs:
        level64 = _precision_geometry(design, size).to("cpu", torch.float64)
        views, pixels = level64.num_views, level64.height * level64.width
        for dim in dims:
            block = random_block(design, dim, seed=dim, released=False).attention.double()
            generator = torch.Generator().manual_seed(dim)
            scales = torch.tensor(key_rms, dtype=torch.float64).repeat_interleave(2 * views)[:, None, None, None]
            shape = (len(scales), dim, level64.height, level64.width)
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            hidden = common_inputs(noise * scales)
            with torch.no_grad():
                update64 = literal_attention(block, hidden, level64, update_only=True)
                change64 = literal_attention(block, hidden, level64) - hidden
            for dtype in dtypes:
                with torch.no_grad():
                    low = _cast(block, dtype).to(device)
                    level = level64.to(device, dtype)
                    inputs = hidden.to(device, dtype)
                    _, update = low.attention_update(inputs, level)
                    update = update.transpose(2, 3).reshape(hidden.shape).cpu()
                    change = low(inputs, level).double().cpu() - hidden
                    floor_update = _floor(block, hidden, level64, dtype, True, device)
                    floor_change = _floor(block, hidden, level64, dtype, False, device).double() - hidden
                finite &= bool(torch.isfinite(update).all() and torch.isfinite(change).all())
                for k, rms in enumerate(key_rms):
                    part = slice(2 * views * k, 2 * views * (k + 1))
                    cases.append({
                        "design": design, "channels": dim, "key_rms": rms, "dtype": str(dtype).replace("torch.", ""),
                        "rel_err": _relative(update[part], update64[part]),
                        "floor_rel_err": _relative(floor_update[part], update64[part]),
                        "block_rel_err": _relative(change[part], change64[part]),
                        "block_floor_rel_err": _relative(floor_change[part], change64[part]),
                    })
    summary = {}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        rows = [case for case in cases if case["dtype"] == name]
        summary[name] = {
            "max_rel_err": max(case["rel_err"] for case in rows),
            "floor_rel_err": max(case["floor_rel_err"] for case in rows),
            "block_max_rel_err": max(case["block_rel_err"] for case in rows),
            "block_floor_rel_err": max(case["block_floor_rel_err"] for case in rows),
            "worst_ratio_to_floor": max(case["rel_err"] / case["floor_rel_err"] for case in rows),
        }
    return {"benchmark": "precision", "dtypes": summary, "all_finite": finite, "cases": cases, "pixels": pixels}
