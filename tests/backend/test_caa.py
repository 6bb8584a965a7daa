import dataclasses
import math
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.models import caa as caa_module
from backend.models import caa_plan, caa_tokens
from backend.models.caa import CorrespondenceAttention
from backend.models.caa_geometry import grid_from_level_coords
from backend.models.caa_plan import AttentionPlan, plan_attention
from backend.models.caa_tokens import LevelGeometry

VIEWS, HEIGHT, WIDTH, SLOTS, SAMPLES, DIM = 3, 4, 5, 2, 3, 64
TOKENS = SLOTS * SAMPLES
PLANS = [
    AttentionPlan("input_space", "embedding_bag", False, 7),
    AttentionPlan("input_space", "embedding_bag", True, 7),
    AttentionPlan("per_token", "embedding_bag", True, 7),
    AttentionPlan("input_space", "gather", False, 5),
    AttentionPlan("per_token", "gather", True, 5),
    AttentionPlan("differences", "embedding_bag", False, 7),
    AttentionPlan("differences", "gather", False, 5),
]
"""Every form, fused or not, both lookups; chunks of 7 and 5 queries split views and samples unevenly."""


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


def randomised_block(encoding_inputs: int, mask_invalid: bool, seed: int = 0, dim: int = DIM):
    """Random weights whose matrices scale with the width, so wide blocks stay as well conditioned as narrow ones."""
    torch.manual_seed(seed)
    block = CorrespondenceAttention(dim, encoding_inputs, mask_invalid).double()
    with torch.no_grad():
        for param in block.parameters():
            scale = 0.3 * math.sqrt(DIM / param.shape[1]) if param.dim() == 2 else 0.3
            param.copy_(torch.randn_like(param) * scale)
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


@cache
def reference_case(encoding_inputs: int, mask_invalid: bool, valid_fraction: float, dim: int):
    """Block, input, geometry and the literal reference's output of one case, computed once."""
    geometry, raw = random_tokens(0, encoding_inputs, valid_fraction=valid_fraction)
    block = randomised_block(encoding_inputs, mask_invalid, dim=dim)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 * VIEWS, dim, HEIGHT, WIDTH, dtype=torch.float64, generator=generator)  # two CFG halves
    with torch.no_grad():
        expected = reference(block, hidden, raw)
    return block, hidden, geometry, expected


def force_plan(monkeypatch, plan: AttentionPlan) -> None:
    """Every query with several tokens attends in ``plan``'s form and chunks (one token has one form)."""
    def forced(queries, tokens, *args):
        return plan if tokens > 1 else dataclasses.replace(plan_attention(queries, tokens, *args), chunk=plan.chunk)

    monkeypatch.setattr(caa_module, "plan_attention", forced)


@pytest.mark.parametrize("encoding_inputs", [1, 2])
@pytest.mark.parametrize("mask_invalid", [True, False])
@pytest.mark.parametrize("cache_encodings", [True, False])
@pytest.mark.parametrize("valid_fraction", [0.7, 0.3])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.form}-{p.lookup}-{'fused' if p.fused else 'bmm'}")
def test_fast_attention_matches_the_literal_reference(
    encoding_inputs, mask_invalid, cache_encodings, valid_fraction, plan, monkeypatch
):
    block, hidden, geometry, expected = reference_case(encoding_inputs, mask_invalid, valid_fraction, DIM)
    if valid_fraction < 0.5:  # sparse validity: the attention really does leave invalid tokens out
        assert geometry.key_tokens(drop_invalid=True).count < TOKENS
    force_plan(monkeypatch, plan)
    monkeypatch.setattr(caa_module, "FEED_FORWARD_ROWS", 7)  # uneven feed-forward row blocks
    monkeypatch.setattr(caa_module, "FEED_FORWARD_ELEMENTS", 0)
    monkeypatch.setattr(caa_tokens, "ENCODING_CACHE_ELEMENTS", 2**30 if cache_encodings else 0)
    with torch.no_grad():
        got = block(hidden, geometry.to("cpu", torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [320, 1280])
@pytest.mark.parametrize("encoding_inputs", [1, 2])
@pytest.mark.parametrize("plan", [None, *PLANS[1:3]], ids=lambda p: "planned" if p is None else p.form)
def test_fast_attention_matches_the_reference_at_sd2_widths(dim, encoding_inputs, plan, monkeypatch):
    """SD 2's widths split into 10 and 40 heads of 32 channels, as the released blocks do."""
    block, hidden, geometry, expected = reference_case(encoding_inputs, False, 0.7, dim)
    assert block.heads == dim // 32
    if plan is not None:
        force_plan(monkeypatch, plan)
    with torch.no_grad():
        got = block(hidden, geometry.to("cpu", torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_plan_follows_the_shapes(monkeypatch):
    """Many tokens per query favour input-space queries, few tokens where large products are cheap the differences."""
    panorama_cpu = plan_attention(8 * 4096, 9, 320, 10, torch.float32, "cpu")
    depth_gpu = plan_attention(12 * 768, 4, 320, 10, torch.float16, "cuda")
    depth_wide_gpu = plan_attention(12 * 48, 4, 1280, 40, torch.float32, "cuda")
    assert (panorama_cpu.form, panorama_cpu.fused) == ("input_space", False)
    assert (depth_gpu.form, depth_gpu.fused) == ("per_token", True)  # half precision: no rounded differences
    assert depth_wide_gpu.form == "differences"
    # On a CPU two tokens take the differences at every width, more tokens the input-space
    # form; the differences again where memory is six times slower: the cost model weighs
    # flops against traffic, not devices.
    for dim in (320, 640, 1280):
        assert plan_attention(1000, 2, dim, dim // 32, torch.float32, "cpu").form == "differences"
        assert plan_attention(1000, 3, dim, dim // 32, torch.float32, "cpu").form == "input_space"
    slower_memory = caa_plan.Balance(2.15e11, 2.0e11, 2.0e9, 2**24)
    assert plan_attention(12 * 48, 4, 1280, 40, torch.float32, "cpu").form == "input_space"
    monkeypatch.setitem(caa_plan.BALANCE, ("cpu", False), slower_memory)
    assert plan_attention(12 * 48, 4, 1280, 40, torch.float32, "cpu").form == "differences"
    monkeypatch.undo()
    # Half precision always takes the fused kernel, which keeps the logits in float32.
    assert plan_attention(8 * 4096, 9, 320, 10, torch.bfloat16, "cpu").fused
    assert plan_attention(1000, 2, 320, 10, torch.float16, "cpu").fused
    # Chunks fit the device's budget where that leaves enough queries per chunk, hold at least
    # MIN_CHUNK_QUERIES otherwise, and never exceed the queries there are.
    assert plan_attention(5, 9, 320, 10, torch.float32, "cpu").chunk == 5
    narrow = plan_attention(10**6, 9, 320, 10, torch.float32, "cpu")
    budget = caa_plan.BALANCE[("cpu", False)].chunk_bytes
    assert caa_plan.MIN_CHUNK_QUERIES < narrow.chunk and narrow.chunk * 4 * 320 * (9 + 2 * 10) <= budget
    assert plan_attention(10**6, 9, 2560, 80, torch.float32, "cpu").chunk == caa_plan.MIN_CHUNK_QUERIES
    assert plan_attention(10**6, 9, 1280, 40, torch.float16, "cuda").chunk > 1000


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


@pytest.mark.parametrize("tokens", [3, 4])  # odd and even neighbour counts
@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 1000])
def test_chunks_pair_the_released_depth_encoding_as_the_whole_level_does(tokens, chunk, monkeypatch):
    """The released depth encoding pairs consecutive scalars of a view: chunks must start on a pair."""
    from backend.models.released_encoding import ReleasedDepthEncoding

    rng = np.random.default_rng(tokens)
    views, height, width, dim = 3, 5, 3, 64  # 15 pixels: odd, so views' pairs straddle chunk and view ends
    pixels = height * width
    source = torch.from_numpy(np.array([[(v + 1 + n) % views for n in range(tokens)] for v in range(views)]))
    coords = rng.uniform(-0.5, [width - 0.5, height - 0.5], size=(views, tokens, pixels, 1, 2))
    valid = torch.from_numpy(rng.random((views, pixels, tokens)) < 0.8)
    values = torch.from_numpy(rng.uniform(0.0, 2.0, size=(views, pixels, tokens, 1)))
    grid = grid_from_level_coords(coords, height, width).double()
    geometry = LevelGeometry(height, width, source, grid, valid, values)
    block = randomised_block(1, mask_invalid=False)
    block.encoding = ReleasedDepthEncoding(dim)
    hidden = torch.randn(2 * views, dim, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole_plan = AttentionPlan("input_space", "embedding_bag", False, 10**6)
    force_plan(monkeypatch, whole_plan)
    with torch.no_grad():
        whole = block(hidden, geometry)
    force_plan(monkeypatch, AttentionPlan("input_space", "embedding_bag", False, chunk))
    monkeypatch.setattr(caa_tokens, "ENCODING_CACHE_ELEMENTS", 0)  # every chunk encodes its own range
    with torch.no_grad():
        chunked = block(hidden, LevelGeometry(height, width, source, geometry.grid, valid, values))
    assert (chunked - whole).abs().max() <= 1e-5


@pytest.mark.parametrize("amd", [False, True])
def test_dense_layers_give_f_linear_numbers_on_either_vendors_path(monkeypatch, amd):
    monkeypatch.setattr(caa_module, "_mkl_runs_avx2_only", lambda: amd)
    torch.manual_seed(6)
    x, weight, bias = torch.randn(3, 70, 48), torch.randn(96, 48), torch.randn(96)
    reference = x.double() @ weight.double().T + bias.double()
    result = caa_module.linear(x, weight, bias)
    assert result.shape == (3, 70, 96)
    assert float((result.double() - reference).norm() / reference.norm()) < 1e-6


def view_groups(seed: int, dim: int = DIM) -> caa_tokens.ViewGroups:
    """Four views in two parts, with one and with three neighbour slots, and validity of every kind."""
    rng = np.random.default_rng(seed)
    pixels, parts, owners = HEIGHT * WIDTH, [], [torch.tensor([0, 2]), torch.tensor([1, 3])]
    for slots, owned in zip((1, 3), owners, strict=True):
        views = len(owned)
        source = torch.from_numpy(np.array([[(int(v) + 1 + n) % 4 for n in range(slots)] for v in owned]))
        coords = rng.uniform(-0.5, [WIDTH - 0.5, HEIGHT - 0.5], size=(views, slots, pixels, 1, 2))
        valid = torch.from_numpy(rng.random((views, pixels, slots)) < 0.5)
        values = torch.from_numpy(rng.uniform(0.0, 2.0, size=(views, pixels, slots, 1)))
        parts.append(LevelGeometry(HEIGHT, WIDTH, source, grid_from_level_coords(coords, HEIGHT, WIDTH), valid, values))
    return caa_tokens.ViewGroups(4, tuple(parts), tuple(owners))


def test_masked_queries_are_bucketed_by_their_valid_token_count():
    groups = view_groups(0)
    buckets = groups.buckets(drop_invalid=True, dtype=torch.float64)
    counts = torch.zeros(4, HEIGHT * WIDTH, dtype=torch.long)
    for owners, part in groups.groups():
        counts[owners] = part.valid.sum(dim=-1)
    seen = torch.cat([b.queries for b in buckets])
    # Every query with a valid token is in exactly one bucket, and no other query is.
    assert sorted(seen.tolist()) == sorted(torch.nonzero(counts.view(-1) > 0)[:, 0].tolist())
    assert [b.tokens for b in buckets] == sorted({b.tokens for b in buckets})
    for bucket in buckets:
        assert bool((counts.view(-1)[bucket.queries] == bucket.tokens).all())
    # Both parts' queries with one valid token share a bucket.
    assert len(buckets[0].pieces) == 2 and buckets[0].tokens == 1
    # Without masking (released behaviour) every part stays whole, in order, with all its slots.
    whole = groups.buckets(drop_invalid=False, dtype=torch.float64)
    assert [b.tokens for b in whole] == [1, 3]
    assert whole[1].queries.tolist() == [p + v * HEIGHT * WIDTH for v in (1, 3) for p in range(HEIGHT * WIDTH)]


@pytest.mark.parametrize("form", ["input_space", "differences"])
@pytest.mark.parametrize("cache_encodings", [True, False])
def test_bucketed_masked_attention_matches_the_literal_block(cache_encodings, form, monkeypatch):
    """Views with different neighbour counts, queries with none to three valid tokens: the literal block's numbers."""
    from backend.models.caa import CAABlock
    from backend.models.literal_caa import literal_block

    torch.manual_seed(3)
    block = CAABlock(DIM, 1, with_resnet=True, mask_invalid=True, groups=8).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * (0.3 * math.sqrt(DIM / param.shape[1]) if param.dim() > 1 else 0.3))
    monkeypatch.setattr(caa_tokens, "ENCODING_CACHE_ELEMENTS", 2**30 if cache_encodings else 0)
    force_plan(monkeypatch, AttentionPlan(form, "embedding_bag", False, 5))
    groups = view_groups(1)
    hidden = torch.randn(2 * 4, DIM, HEIGHT, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = block(hidden, groups)
        expected = literal_block(block, hidden, groups)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_the_block_leaves_its_input_untouched_in_either_memory_layout():
    """The update goes in place into the block's own pixel-major copy, never into the caller's features."""
    geometry, _ = random_tokens(4, 2)
    block = randomised_block(2, True).float()
    hidden = torch.randn(VIEWS, DIM, HEIGHT, WIDTH)
    with torch.no_grad():
        expected = block(hidden.clone(), geometry)
        for features in (hidden.clone(), hidden.clone().to(memory_format=torch.channels_last)):
            before = features.clone()
            torch.testing.assert_close(block(features, geometry), expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(features, before)


@pytest.mark.parametrize("transposed_rows", [0, 1000], ids=["row-major", "transposed"])
def test_the_feed_forward_in_scratch_gives_the_plain_forms_numbers(monkeypatch, transposed_rows):
    """Rows far larger than the feed-forward's change (RMS 50): the output is the plain form's,
    within one unit in the last place, with the hidden layer in either layout (summing the last
    product onto the residual inside the matrix product would round it against the residual's
    magnitude once per partial sum)."""
    torch.manual_seed(5)
    block = CorrespondenceAttention(320, 1)
    monkeypatch.setattr(caa_module, "FEED_FORWARD_ROWS", 1000)
    monkeypatch.setattr(caa_module, "FEED_FORWARD_ELEMENTS", 0)
    monkeypatch.setattr(caa_module, "FEED_FORWARD_TRANSPOSED_ROWS", transposed_rows)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
        x = torch.randn(2500, 320) * 50  # three blocks of rows, the last one short
        if not block.ff.takes_scratch(x):
            pytest.skip("this CPU's products go through oneDNN, as in the plain form")
        plain = torch.cat([part + block.ff(block.norm2(part)) for part in x.split(1000)])
        got = block._feed_forward(x.clone())
    ulp = torch.nextafter(plain.abs(), torch.tensor(math.inf)) - plain.abs()
    assert bool(((got - plain).abs() <= ulp).all())
