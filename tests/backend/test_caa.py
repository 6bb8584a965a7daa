import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.models import caa as caa_module
from backend.models.caa import CorrespondenceAttention, LevelGeometry
from backend.models.caa_geometry import grid_from_level_coords

VIEWS, HEIGHT, WIDTH, SLOTS, SAMPLES, DIM = 3, 4, 5, 2, 3, 64
TOKENS = SLOTS * SAMPLES


def random_tokens(seed: int, encoding_inputs: int, all_invalid_pixel: bool = True, valid_fraction: float = 0.7):
    """Random key tokens: a source view per slot, level coordinates (some outside), validity, encodings."""
    rng = np.random.default_rng(seed)
    pixels = HEIGHT * WIDTH
    source = rng.integers(0, VIEWS, size=(VIEWS, SLOTS))
    coords = rng.uniform([-1.5, -1.5], [WIDTH + 0.5, HEIGHT + 0.5], size=(VIEWS, SLOTS, pixels, SAMPLES, 2))
    valid = rng.random((VIEWS, pixels, TOKENS)) < valid_fraction
    if all_invalid_pixel:
        valid[1, 7] = False  # a pixel with no correspondence at all
    encoding = rng.uniform(-1.5, 1.5, size=(VIEWS, pixels, TOKENS, encoding_inputs)).astype(np.float32)
    grid = grid_from_level_coords(coords, HEIGHT, WIDTH)
    geometry = LevelGeometry(
        HEIGHT, WIDTH, torch.from_numpy(source), grid, torch.from_numpy(valid), torch.from_numpy(encoding)
    )
    return geometry, (source, coords, valid, encoding)


def randomised_block(encoding_inputs: int, mask_invalid: bool, seed: int = 0) -> CorrespondenceAttention:
    torch.manual_seed(seed)
    block = CorrespondenceAttention(DIM, encoding_inputs, mask_invalid).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return block


def reference(block: CorrespondenceAttention, hidden: torch.Tensor, raw) -> torch.Tensor:
    """Slow and literal: per query pixel, sample every token with grid_sample, full K/V projections."""
    source, coords, valid, encoding = raw
    batch_views = hidden.shape[0]
    out = hidden.clone()
    heads, head_dim = block.heads, caa_module.HEAD_DIM
    for sample in range(batch_views // VIEWS):
        for view in range(VIEWS):
            for pixel in range(HEIGHT * WIDTH):
                y, x = divmod(pixel, WIDTH)
                feature = hidden[sample * VIEWS + view, :, y, x]
                keys = []
                for t in range(TOKENS):
                    slot, k = divmod(t, SAMPLES)
                    src = hidden[sample * VIEWS + source[view, slot]][None]
                    gx = (2 * coords[view, slot, pixel, k, 0] + 1) / WIDTH - 1
                    gy = (2 * coords[view, slot, pixel, k, 1] + 1) / HEIGHT - 1
                    grid = torch.tensor([[[[gx, gy]]]], dtype=hidden.dtype)
                    sampled = F.grid_sample(src, grid, align_corners=False, padding_mode="zeros")[0, :, 0, 0]
                    z = sampled + block.encoding(torch.from_numpy(encoding[view, pixel, t]).to(hidden.dtype))
                    if not block.mask_invalid and not valid[view, pixel, t]:
                        z = torch.zeros_like(z)
                    keys.append(block.norm1(z))
                context = torch.stack(keys)
                query_in = feature + block.encoding(torch.zeros(encoding.shape[-1], dtype=hidden.dtype))
                q = block.to_q(block.norm1(query_in)).view(heads, head_dim)
                k = block.to_k(context).view(TOKENS, heads, head_dim)
                v = block.to_v(context).view(TOKENS, heads, head_dim)
                logits = torch.einsum("hd,thd->ht", q, k) / math.sqrt(head_dim)
                usable = torch.from_numpy(valid[view, pixel])
                if block.mask_invalid:
                    logits = logits.masked_fill(~usable, float("-inf"))
                attended = torch.einsum("ht,thd->hd", logits.softmax(-1), v).reshape(-1)
                updated = feature + block.to_out(attended)
                if block.mask_invalid and not usable.any():
                    updated = feature  # nothing to attend to: only the feed-forward applies
                out[sample * VIEWS + view, :, y, x] = updated + block.ff(block.norm2(updated))
    return out


@pytest.mark.parametrize("encoding_inputs", [1, 2])
@pytest.mark.parametrize("mask_invalid", [True, False])
@pytest.mark.parametrize("cache_encodings", [True, False])
@pytest.mark.parametrize("valid_fraction", [0.7, 0.3])
def test_fast_attention_matches_the_literal_reference(
    encoding_inputs, mask_invalid, cache_encodings, valid_fraction, monkeypatch
):
    geometry, raw = random_tokens(0, encoding_inputs, valid_fraction=valid_fraction)
    if valid_fraction < 0.5:  # sparse validity: the attention really does leave invalid tokens out
        assert geometry.key_tokens(drop_invalid=True).count < TOKENS
    block = randomised_block(encoding_inputs, mask_invalid)
    hidden = torch.randn(2 * VIEWS, DIM, HEIGHT, WIDTH, dtype=torch.float64)  # two samples (CFG halves)
    expected = reference(block, hidden, raw)
    monkeypatch.setattr(caa_module, "CHUNK_ELEMENTS", 2 * 3 * VIEWS * TOKENS * DIM)  # uneven pixel chunks
    monkeypatch.setattr(caa_module, "FEED_FORWARD_ROWS", 7)  # uneven feed-forward row blocks
    monkeypatch.setattr(caa_module, "ENCODING_CACHE_ELEMENTS", 2**30 if cache_encodings else 0)
    with torch.no_grad():
        got = block(hidden, geometry.to("cpu", torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_new_block_is_exactly_the_identity():
    geometry, _ = random_tokens(1, 2)
    block = CorrespondenceAttention(DIM, 2)
    hidden = torch.randn(VIEWS, DIM, HEIGHT, WIDTH)
    with torch.no_grad():
        assert torch.equal(block(hidden, geometry), hidden)


def test_samples_of_a_batch_do_not_mix():
    geometry, _ = random_tokens(2, 2)
    block = randomised_block(2, True).float()
    first, second = torch.randn(VIEWS, DIM, HEIGHT, WIDTH), torch.randn(VIEWS, DIM, HEIGHT, WIDTH)
    with torch.no_grad():
        together = block(torch.cat([first, second]), geometry)
        alone = block(second, geometry)
    torch.testing.assert_close(together[VIEWS:], alone, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_reported():
    geometry, _ = random_tokens(3, 2)
    block = CorrespondenceAttention(DIM, 2)
    with pytest.raises(ValueError, match="do not match"):
        block(torch.randn(VIEWS, DIM, HEIGHT + 1, WIDTH), geometry)
