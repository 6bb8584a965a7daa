"""How a CAA block computes its attention over key tokens, chosen from the shapes.

The forms are exact; they cost differently. With ``zhat_t`` a key token normalised by the
keys' LayerNorm (no affine), ``W_k`` and ``W_v`` the key and value matrices with the LayerNorm
gain folded in, and ``h`` heads of ``d`` channels over ``C`` channels and ``T`` tokens:

* ``input_space``: each head's query is moved into input space once, ``qtilde_h = W_k,h^T q_h``
  (C x C per query), scored against the normalised tokens, and the heads' averages of tokens are
  projected once (another C x C). About ``4 C^2 + 4 h T C`` flops per query, all in small
  batched products (one per head or per query), and every query writes and reads ``h x C``
  values twice. It wins with many tokens per query: panoramas (9 to 18 tokens).
* ``per_token``: the released way, keys and values of every token projected (``4 T C^2``
  flops per query as one large matrix product), then a plain attention with head size ``d``.
  The ``differences`` form below does the same with fewer products and less traffic, so in
  float32 the cost model never prefers it; in half precision it is the fused kernel's form.
* ``differences``: tokens taken relative to the last one. A softmax does not change when all
  logits move together, and its weights sum to one, so the attended value is
  ``v_last + sum_t p_t (v_t - v_last)`` with logits ``q . (k_t - k_last)``: keys and values of
  the ``T - 1`` differences and a value of the last token, ``(4 T - 2) C^2`` flops per query in
  two large products and a few passes over ``T x C`` values per query, no attention kernel.
  With two tokens the softmax is a sigmoid and the form does three quarters of ``per_token``'s
  products. It wins where large products are cheap against memory traffic and few tokens meet
  wide levels (``h x C`` per query outweighs ``T x C``): two tokens on a CPU, the depth
  design's 2 to 5 on a GPU. Not in half precision: there the differences are rounded to the
  working dtype, and the depth layout's update came out 1.27-1.28 x as far from float64 as a
  plain attention's (the fused per-token form: 1.13-1.14 x), so half types keep ``per_token``.

A query with one token (``one_token``) needs none of them: its softmax weight is 1, so the
attended value is the token's value, and its update one dense product with the output
projection folded in, no query vector. Masked attention groups queries by how many valid tokens they have
(:func:`~backend.models.caa_tokens.token_buckets`); on trajectories a fifth of the queries have one.

The cost of a form is its large-product flops over the device's dense rate, its small batched
products over the batched rate, and its memory traffic over the bandwidth (:data:`BALANCE`);
the cheapest one runs. The token lookup is the same for all: an ``embedding_bag`` over
pixel-major features (it reads the four taps of a token and writes one vector; ``gather``
writes all four first, and is kept for devices whose ``embedding_bag`` lacks weights). Chunks
of queries are sized so the working set fits the device's budget (a cache-sized block on a CPU,
a bounded transient on a GPU), but hold at least :data:`MIN_CHUNK_QUERIES`: each chunk costs a
dozen kernel calls. On a CPU the budget also keeps each chunk's intermediates small enough for
the allocator to hand back memory it already holds: larger ones come as fresh pages from the
system every chunk (at 1280 channels, 64 queries per chunk took 170 ms a block against 75 ms
with 48, the difference all page faults).

Half precision: logits are accumulated and kept in float32 by the fused attention
(``scaled_dot_product_attention``); a plain ``bmm`` would round them to the working dtype. So
the fused kernel always runs the ``per_token`` form, and the ``input_space`` form uses it in
float16 and bfloat16; in float32 two batched matrix products are faster on a CPU for its
shapes (heads as the query rows, a few tokens) and as accurate. The ``differences`` form sums
its logits in float32 itself, but runs in float32 and float64 only (above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["input_space", "per_token", "differences", "one_token"]
Lookup = Literal["embedding_bag", "gather"]


@dataclass(frozen=True)
class Balance:
    """What a device sustains on these kernels: large and small batched products (flop/s), memory
    traffic (bytes/s), and the working set of one chunk."""

    dense_flops: float
    batched_flops: float
    bandwidth: float
    chunk_bytes: int


BALANCE: dict[tuple[str, bool], Balance] = {
    # One core of a 2-core server CPU (AVX-512): fitted to the three forms' time per query at
    # SD 2's widths with 2, 3, 4 and 9 tokens on an Intel Xeon (the depth trajectory's own token
    # buckets; two threads, halved). The fit picks the fastest form in all 12 cases: the
    # differences with two tokens, the input-space queries with more. The input-space form is
    # bound by its per-head intermediates, so its traffic term carries most of its time. Chunks
    # of 16 MiB: the whole depth-design attention ran 10-20 % faster than with 4 MiB at every
    # SD 2 level (fewer calls per query; the chunk still fits the last-level cache).
    ("cpu", False): Balance(dense_flops=0.94e11, batched_flops=1.4e11, bandwidth=0.76e10, chunk_bytes=16 * 2**20),
    ("cpu", True): Balance(dense_flops=2.0e11, batched_flops=0.8e11, bandwidth=1.2e10, chunk_bytes=16 * 2**20),
    # An H100/H200-class GPU, from its data sheet (no GPU figure has been measured here yet):
    # float32 without TF32 and half on tensor cores, small batched products at a quarter of
    # that, HBM3; chunks bound the transient memory instead of fitting a cache.
    ("cuda", False): Balance(dense_flops=5.0e13, batched_flops=1.2e13, bandwidth=2.5e12, chunk_bytes=256 * 2**20),
    ("cuda", True): Balance(dense_flops=4.0e14, batched_flops=1.0e14, bandwidth=2.5e12, chunk_bytes=256 * 2**20),
}
"""(device type, half precision) -> balance. Other devices use the CUDA figures."""

MIN_CHUNK_QUERIES = 32
"""Fewest queries per chunk (unless there are fewer): below this the calls per chunk dominate
(at 1280 channels: 76 ms a block with 32 queries per chunk, 88 ms with 16)."""

WEIGHTED_BAG_DEVICES = ("cpu", "cuda")
"""Devices whose ``embedding_bag`` takes per-sample weights in every dtype; others gather the taps."""


@dataclass(frozen=True)
class AttentionPlan:
    """One level's way of attending: the form, the lookup, fused or not, and queries per chunk."""

    form: Form
    lookup: Lookup
    fused: bool
    chunk: int
    seconds: tuple[tuple[str, float], ...] = ()  # the cost model's estimate per form, per query


CHANNELS_LAST_MIN_PIXELS = 192
"""On a CPU, oneDNN runs the depth blocks' 3 x 3 convolutions faster on channels-last maps from about
this many pixels per map (SD 2's 24 x 32 and 12 x 16 levels: 20 % and 15 % faster), and slower on
the small 1280-channel levels (6 x 8: 30 %, 3 x 4: twice as slow)."""


def resnet_channels_last(height: int, width: int, device: torch.device | str) -> bool:
    """Whether a CAA block's ResNet runs on the channels-last features the attention leaves behind.

    The attention works pixel-major, so those features are channels-last already; the other way
    costs a transpose, which pays where the convolution kernels prefer channels-first.
    """
    return torch.device(device).type == "cpu" and height * width >= CHANNELS_LAST_MIN_PIXELS


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def form_costs(tokens: int, dim: int, heads: int, element_size: int) -> dict[Form, tuple[float, float, float]]:
    """(dense flops, batched flops, bytes) per query of each form's token attention; the shared lookup is left out.

    One token needs no attention: its value is the answer (``one_token``, one dense product).
    """
    if tokens == 1:
        return {"one_token": (2.0 * dim * dim, 0.0, element_size * 2.0 * dim)}
    input_space = (0.0, 4.0 * dim * dim + 4.0 * heads * tokens * dim, element_size * (4.0 * heads + 3.0 * tokens) * dim)
    per_token = (4.0 * tokens * dim * dim, 4.0 * tokens * dim, element_size * 7.0 * tokens * dim)
    costs: dict[Form, tuple[float, float, float]] = {"input_space": input_space, "per_token": per_token}
    if element_size > 2:  # in half precision the rounded differences cost accuracy (module docstring)
        costs["differences"] = ((4.0 * tokens - 2.0) * dim * dim, 0.0, element_size * (6.0 * tokens - 4.0) * dim)
    return costs


def working_bytes(form: Form, tokens: int, dim: int, heads: int, element_size: int) -> int:
    """Bytes one query holds at once inside a chunk: its tokens plus the form's intermediates."""
    extra = {
        "input_space": 2 * heads * dim,
        "per_token": 2 * tokens * dim,
        "differences": (4 * tokens - 3) * dim,
        "one_token": dim,
    }[form]
    return element_size * (tokens * dim + extra)


def plan_attention(
    queries: int, tokens: int, dim: int, heads: int, dtype: torch.dtype, device: torch.device | str
) -> AttentionPlan:
    """The cheaper exact form for ``queries`` queries of ``tokens`` key tokens each, and its chunk size."""
    device_type = torch.device(device).type
    half = is_half(dtype)
    balance = BALANCE.get((device_type, half)) or BALANCE[("cuda", half)]
    element_size = torch.empty((), dtype=dtype).element_size()
    seconds = {
        form: dense / balance.dense_flops + batched / balance.batched_flops + traffic / balance.bandwidth
        for form, (dense, batched, traffic) in form_costs(tokens, dim, heads, element_size).items()
    }
    form: Form = min(seconds, key=seconds.get)
    fused = form == "per_token" or (half and form == "input_space")
    fitting = balance.chunk_bytes // working_bytes(form, tokens, dim, heads, element_size)
    chunk = max(1, min(queries, max(fitting, MIN_CHUNK_QUERIES)))
    lookup: Lookup = "embedding_bag" if device_type in WEIGHTED_BAG_DEVICES else "gather"
    return AttentionPlan(form, lookup, fused, chunk, tuple(sorted(seconds.items())))
