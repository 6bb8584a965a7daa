"""CAA in the precisions a GPU user runs: float32, float16 and bfloat16 against float64.

The bound for half precision is the dtype's own floor: a plain attention (projections and
``scaled_dot_product_attention``) in the same dtype on the same inputs. Feature scales reach RMS
200, where a float16 sum of squares over a 1280-wide token overflows and a bfloat16 logit has
lost the softmax, so a block that reduces in the working dtype fails here.
"""

import math

import pytest
import torch

from backend.models.benchmark import trajectory_neighbours
from backend.models.caa_bench import KEY_RMS, run_precision_benchmark
from backend.models.caa_geometry import depth_geometry
from backend.models.mv_unet import MultiViewUNet
from backend.models.sd2_configs import random_unet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def precision():
    return run_precision_benchmark(dims=(320, 1280), key_rms=KEY_RMS, designs=("depth",), size=4)


def test_every_case_was_measured(precision):
    assert {(c["channels"], c["key_rms"], c["dtype"]) for c in precision["cases"]} == {
        (dim, rms, dtype) for dim in (320, 1280) for rms in KEY_RMS for dtype in ("float32", "float16", "bfloat16")
    }
    assert precision["all_finite"]


def test_float32_matches_float64(precision):
    for case in precision["cases"]:
        if case["dtype"] == "float32":
            assert case["rel_err"] <= 1e-4, case
            assert case["block_rel_err"] <= 1e-4, case


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_as_accurate_as_a_plain_attention(precision, dtype):
    for case in precision["cases"]:
        if case["dtype"] == dtype:
            # The floor is a real rounding error, not zero: the bound means something.
            assert case["floor_rel_err"] > 1e-5, case
            assert case["rel_err"] <= 2 * case["floor_rel_err"], case
            assert case["block_rel_err"] <= 2 * case["block_floor_rel_err"], case


@pytest.fixture(scope="module")
def sd2_depth_model():
    torch.manual_seed(0)
    model = MultiViewUNet(random_unet("depth"), "depth").eval()
    with torch.no_grad():  # trained-like CAA weights: a zero block would hide the attention
        for name, param in model.named_parameters():
            if not name.startswith(("caa_", "condition")):
                continue
            if "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            elif param.dim() > 1:
                param.copy_(torch.randn_like(param) / math.sqrt(math.prod(param.shape[1:])))
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_whole_sd2_sized_multiview_unet_stays_finite(sd2_depth_model, dtype):
    cameras, depths, graph = trajectory_neighbours(2, 1, width=128, height=64)
    geometry = {k: v.to("cpu", dtype) for k, v in depth_geometry(cameras, depths, graph).items()}
    model = sd2_depth_model.to(dtype)
    try:
        generator = torch.Generator().manual_seed(1)
        sample = torch.randn(2, 5, 8, 16, generator=generator).to(dtype)  # levels of 8x16 to 1x2
        text = torch.randn(2, 77, 1024, generator=generator).to(dtype)
        with torch.no_grad():
            plain = model(sample, 500, text)
            joint = model(sample, 500, text, geometry)
        assert torch.isfinite(plain).all() and torch.isfinite(joint).all()
        assert (joint - plain).abs().max() > 1e-3  # the CAA blocks really ran
    finally:
        sd2_depth_model.float()
