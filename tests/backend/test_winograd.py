"""The depth design's ResNet convolutions in Winograd form give the direct convolution's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.models import winograd
from backend.models.caa import ZeroResNet
from backend.models.winograd import MIN_CHANNELS, WinogradConv3x3, winograd_conv3x3, winograd_weights


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("size", [(8, 8), (6, 8), (3, 4), (5, 7), (1, 1), (12, 4)])
def test_winograd_matches_a_float64_convolution_at_every_size(m, size):
    torch.manual_seed(0)
    x = torch.randn(3, 24, *size)
    weight = torch.randn(40, 24, 3, 3) / 15
    reference = F.conv2d(x.double(), weight.double(), padding=1)
    result = winograd_conv3x3(x, winograd_weights(weight, m), m)
    assert result.shape == reference.shape
    # oneDNN's direct form is about 1e-6 away; F(2x2) about as close, F(4x4) a few times further.
    assert relative_error(result, reference) < (3e-6 if m == 2 else 2e-5)


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_residual_is_added_as_the_tiles_are_written(size, layout, monkeypatch):
    """The same numbers as adding it afterwards, where the map tiles exactly and where it is cropped."""
    torch.manual_seed(4)
    x = torch.randn(3, 16, *size)
    residual = torch.randn(3, 16, *size).to(memory_format=layout)
    transformed = winograd_weights(torch.randn(16, 16, 3, 3), 4)
    monkeypatch.setattr(winograd, "_samples_per_chunk", lambda *args: 2)
    expected = residual + winograd_conv3x3(x, transformed, 4)
    assert torch.equal(winograd_conv3x3(x, transformed, 4, residual), expected)


def test_channels_last_and_channels_first_inputs_agree_bitwise():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 8, 12)
    transformed = winograd_weights(torch.randn(16, 16, 3, 3), 4)
    first = winograd_conv3x3(x, transformed, 4)
    last = winograd_conv3x3(x.to(memory_format=torch.channels_last), transformed, 4)
    assert torch.equal(first, last)


def test_chunks_of_samples_give_the_same_numbers(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(5, 16, 8, 8)
    transformed = winograd_weights(torch.randn(16, 16, 3, 3), 4)
    whole = winograd_conv3x3(x, transformed, 4)
    monkeypatch.setattr(winograd, "_samples_per_chunk", lambda *args: 2)  # chunks of 2, 2 and 1 samples
    assert torch.equal(winograd_conv3x3(x, transformed, 4), whole)


def test_the_chunk_count_weighs_weight_reads_against_spilled_tiles():
    mib = 2**20
    # Small transformed weights (320 channels): chunks that stay in cache.
    assert winograd._samples_per_chunk(16, int(2.2 * mib), 15 * mib) * 2.2 * mib <= winograd.CACHE_BYTES
    # Huge transformed weights (1280 channels): one chunk, the weights read once.
    assert winograd._samples_per_chunk(16, int(0.7 * mib), 236 * mib) == 16


def test_zero_weights_give_exactly_zero_so_the_resnet_starts_as_the_identity():
    torch.manual_seed(3)
    resnet = ZeroResNet(MIN_CHANNELS).eval()
    x = torch.randn(2, MIN_CHANNELS, 6, 8)
    with torch.no_grad():
        assert resnet.conv2.uses_winograd(x)
        assert torch.equal(resnet(x), x)


def test_the_layer_follows_weight_changes_and_keeps_conv2d_state_dict_keys():
    torch.manual_seed(4)
    conv = WinogradConv3x3(MIN_CHANNELS, MIN_CHANNELS).eval()
    plain = torch.nn.Conv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1, bias=False)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, MIN_CHANNELS, 4, 4)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict(plain.state_dict())  # a checkpoint loaded after a first call
        reference = F.conv2d(x.double(), plain.weight.double(), padding=1)
        assert conv.uses_winograd(x)
        assert relative_error(conv(x), reference) < 2e-5
        conv.weight.mul_(2.0)  # an in-place update
        assert relative_error(conv(x), 2 * reference) < 2e-5


def test_training_and_half_precision_keep_the_direct_convolution():
    torch.manual_seed(5)
    conv = WinogradConv3x3(MIN_CHANNELS, MIN_CHANNELS)
    x = torch.randn(1, MIN_CHANNELS, 4, 4, requires_grad=True)
    assert not conv.uses_winograd(x)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        assert conv.uses_winograd(x)
        assert not conv.to(torch.bfloat16).uses_winograd(x.to(torch.bfloat16))
    narrow = WinogradConv3x3(MIN_CHANNELS // 2, MIN_CHANNELS // 2)
    with torch.no_grad():
        assert not narrow.uses_winograd(torch.randn(1, MIN_CHANNELS // 2, 4, 4))

