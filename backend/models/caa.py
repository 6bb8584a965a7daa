"""Correspondence-aware attention (CAA): each pixel attends to what its neighbour views see there.

Every query pixel of view i attends to a handful of key tokens (:mod:`~backend.models.caa_tokens`):
bilinear samples of neighbour views' feature maps at (and around) its correspondences, each with
a positional encoding of the displacement (panoramas) or the depth disagreement (scenes) added.
The block is a transformer block (LayerNorm, attention, GEGLU feed-forward) whose output
projection and last feed-forward layer start at zero, so a new block is exactly the identity.

Exact fast forms. With ``z_t = sample_t + pe_t`` and ``LN(z) = gamma * zhat + beta``, the keys'
shift ``W_k beta`` is the same for every token of a query and cancels in the softmax, and the
values' shift ``W_v beta`` passes through the weighted average unchanged (weights sum to one), so
the block attends over the normalised tokens ``zhat_t`` with ``W diag(gamma)`` and adds
``W_v beta`` once, through the output projection's bias. Over those tokens it either moves each
head's query into input space or projects every token, whichever the shapes make cheaper
(:mod:`~backend.models.caa_plan`); both give the released block's numbers, positional encoding
and the released zero-vector keys included.

Work per query (the query projection, the output projection, the feed-forward) runs once for all
views of a level in large matrix products; only the attention over key tokens runs per bucket of
queries with the same token count (:func:`~backend.models.caa_tokens.token_buckets`) and in
chunks. A query attends over its valid tokens only, so a query with none gets no update and one
with a single token takes that token's value (its softmax weight is 1). Bilinear lookups are one
``embedding_bag`` over the features stored pixel-major, with taps worked out once per job: it
writes each token's vector straight into (pixel, token, channel) order and reads whole rows.

Precision: LayerNorm statistics, the attention's logits and softmax, and the encodings are
computed in float32 whatever the working dtype (float16 overflows a sum of squares of a
1280-wide token of RMS 7; bfloat16 logits lose the softmax); matrix products and the stored
activations use the working dtype.
"""

from __future__ import annotations

import functools
import math
import platform
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .caa_plan import AttentionPlan, plan_attention, resnet_channels_last
from .caa_tokens import KeyTokens, LevelGeometry, TokenBucket, ViewGroups
from .winograd import WinogradConv3x3

__all__ = [
    "HEAD_DIM",
    "CAABlock",
    "CorrespondenceAttention",
    "GEGLUFeedForward",
    "KeyTokens",
    "LevelGeometry",
    "SinusoidalEncoding",
    "ViewGroups",
    "ZeroResNet",
]

HEAD_DIM = 32
LAYER_NORM_EPS = 1e-5
FEED_FORWARD_ROWS = 1024  # fewest query rows per feed-forward block
FEED_FORWARD_ELEMENTS = 2**20  # hidden-layer elements per feed-forward block: 4 MB in float32 stays in cache
FEED_FORWARD_TRANSPOSED_ROWS = 512
"""Most rows per feed-forward block that get the hidden layer transposed. Measured on two Xeon
cores, alternating in one process: at SD 2's 3 x 4 level (192 rows at 1280 channels) three blocks
took 263 against 281 ms, at the panorama's 8 x 8 (512 rows) 390-403 against 406; with 768 rows
and more it was no faster (at 1024 rows and 320 channels up to 1 % slower)."""


class Float32Buffers(nn.Module):
    """A module whose buffers stay float32 through dtype casts of the model (moves still apply).

    Encoding frequencies reach 64 here and 1.7e9 in the released encodings: float16 cannot hold
    the latter, and neither half type keeps the phases of the former.
    """

    def _apply(self, fn, recurse: bool = True):
        kept = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            self._buffers[name] = buffer.to(self._buffers[name].device)
        return self


class SinusoidalEncoding(Float32Buffers):
    """sin/cos of each input scalar at ``dim // (2 * inputs)`` geometric frequencies, concatenated.

    Layout: all sines (input 0 over frequencies, then input 1, ...), then all cosines, so the
    encoding of 0 is ``[0 ... 0, 1 ... 1]``. Frequencies run from 1 to ``2 ** octaves`` radians per
    unit: displacements of a fraction of a pixel and depth errors of a few percent stay distinct.
    Computed in the inputs' precision (float32 geometry, or float64).
    """

    def __init__(self, dim: int, inputs: int, octaves: float = 6.0):
        super().__init__()
        if dim % (2 * inputs):
            raise ValueError(f"dim {dim} must be a multiple of {2 * inputs}")
        count = dim // (2 * inputs)
        self.dim, self.key = dim, ("sinusoidal", dim, inputs, octaves)
        self.register_buffer("freq_bands", 2.0 ** torch.linspace(0.0, octaves, count), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        angles = (values[..., :, None] * self.freq_bands.to(values.dtype)).flatten(-2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, run on an AMD CPU in float32 as a oneDNN 1 x 1 convolution over the rows.

    ``F.linear`` calls MKL's sgemm there, which runs its AVX2 code on AMD processors: half the
    rate of oneDNN's AVX-512 kernels for the same product (150-210 against 260-470 GFLOP/s on
    two EPYC cores at these blocks' shapes). On Intel processors MKL runs AVX-512 and is the
    faster of the two (feed-forward at 1280 channels: 247 against 191 GFLOP/s on two Xeon cores),
    so ``F.linear`` stays. The rows (N, C) already are a channels-last image of N x 1 pixels, so
    nothing is copied either way.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _mkl_runs_avx2_only():
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    image = rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.view(*weight.shape, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def _mkl_runs_avx2_only() -> bool:
    """Whether this is an AMD processor with oneDNN at hand (MKL then keeps to its AVX2 code)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in cpuinfo)
    except OSError:
        return "AuthenticAMD" in platform.processor()  # Windows names the vendor there


class GEGLUFeedForward(nn.Module):
    """dim -> 4 dim (GELU-gated) -> dim, the feed-forward of Stable Diffusion's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self._gated(x), self.out.weight, self.out.bias)

    def residual_into(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        out: torch.Tensor,
        hidden: torch.Tensor,
        gate: torch.Tensor,
        transposed: bool = False,
    ) -> None:
        """``out = residual + FF(x)`` for rows ``x`` (n, C), with ``hidden`` and ``gate`` (n, 4 C) as
        scratch, or (4 C, n) with ``transposed``: the hidden layer laid out one row per unit.

        The products write into memory the caller keeps across blocks of rows (a fresh hidden
        layer per block costs an allocation and, on a CPU, page faults) and the GELU runs in
        place: at 320 channels the feed-forward ran 10 % faster so. The transposed layout takes
        the weights as the products' left operand, which streams them once over all rows: with
        few rows it is faster on a CPU (:data:`FEED_FORWARD_TRANSPOSED_ROWS`). The last product is not
        accumulated onto the residual: a CPU's sgemm adds its partial sums into the output
        several times, and rounding them against the residual's magnitude put the change 2-4 x
        further from float64. Not for autograd (``out=`` products).
        """
        n, dim = x.shape
        width = self.out.in_features

        def project(units: slice, into: torch.Tensor) -> torch.Tensor:
            weight, bias = self.proj.weight[units], self.proj.bias[units]
            if transposed:
                return torch.addmm(bias[:, None], weight, x.t(), out=into)
            return torch.addmm(bias, x, weight.t(), out=into)

        gated = project(slice(0, width), hidden).mul_(torch.ops.aten.gelu_(project(slice(width, None), gate)))
        change = gate.view(-1)[: n * dim].view(n, dim)  # the gate's memory, free again
        torch.add(residual, torch.addmm(self.out.bias, gated.t() if transposed else gated, self.out.weight.t(),
                                        out=change), out=out)

    def takes_scratch(self, x: torch.Tensor) -> bool:
        """Whether :meth:`residual_into` serves ``x``: no autograd recording, and not float32 on a CPU
        whose MKL keeps to AVX2 (there :func:`linear` routes the products through oneDNN)."""
        if _records_grad((x, self.proj.weight, self.out.weight)):
            return False
        return not (x.device.type == "cpu" and x.dtype == torch.float32 and _mkl_runs_avx2_only())

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden layer times the GELU of the gate.

        Two products rather than one split in halves: the halves of one product are strided
        views, on which a CPU's GELU and multiply run five and two times slower.
        """
        width = self.out.in_features
        weight, bias = self.proj.weight, self.proj.bias
        return linear(x, weight[:width], bias[:width]).mul_(F.gelu(linear(x, weight[width:], bias[width:])))


Geometry = LevelGeometry | ViewGroups


class CorrespondenceAttention(nn.Module):
    """One CAA block for feature maps of ``dim`` channels.

    ``encoding_inputs`` is 2 for displacement encodings (panoramas) and 1 for depth-error
    encodings. With ``mask_invalid`` (the default) keys without a valid correspondence are left
    out of the softmax; without it they enter as zero vectors, as in the released code.
    """

    def __init__(self, dim: int, encoding_inputs: int = 2, mask_invalid: bool = True):
        super().__init__()
        if dim % HEAD_DIM:
            raise ValueError(f"dim {dim} must be a multiple of the head size {HEAD_DIM}")
        self.dim, self.heads = dim, dim // HEAD_DIM
        self.mask_invalid = mask_invalid
        self.encoding = SinusoidalEncoding(dim, encoding_inputs)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = GEGLUFeedForward(dim)
        for layer in (self.to_out, self.ff.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._projections: tuple[tuple, Projections] | None = None

    def forward(self, hidden: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """``hidden`` (B * V, C, h, w), views of one sample consecutive -> the same shape and layout."""
        return same_layout(self.channels_last(hidden, geometry), hidden)

    def channels_last(self, hidden: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """The block's output as (B * V, C, h, w) with channels-last memory: how it is computed, uncopied."""
        total, channels, height, width = hidden.shape
        x, updates = self._attention(hidden, geometry)
        # The pixel-major features are a copy of ``hidden`` unless it came channels-last; a copy
        # takes the updates in place when autograd does not need it.
        private = x.untyped_storage().data_ptr() != hidden.untyped_storage().data_ptr()
        in_place = private and not _records_grad((x, *(rows for _, rows in updates)))
        for queries, rows in updates:
            x = x.index_add_(1, queries, rows) if in_place else x.index_add(1, queries, rows)
        x = self._feed_forward(x.view(-1, channels))
        return x.view(total, height, width, channels).permute(0, 3, 1, 2)

    def attention_update(self, hidden: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
        """The features pixel-major (B, V, P, C) and what the attention adds to them, before the feed-forward.

        Pixels without a valid correspondence get no update when invalid keys are masked.
        """
        x, updates = self._attention(hidden, geometry)
        dense = torch.zeros_like(x)
        for queries, rows in updates:
            dense.index_copy_(1, queries, rows)
        views = geometry.num_views
        return x.view(x.shape[0], views, -1, self.dim), dense.view(x.shape[0], views, -1, self.dim)

    def _attention(
        self, hidden: torch.Tensor, geometry: Geometry
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The features pixel-major (B, V * P, C) and the attention's updates: pairs of queries (N,)
        and their rows (B, N, C); a query without valid tokens is in none.

        Queries are taken bucket by bucket (:func:`~backend.models.caa_tokens.token_buckets`). A
        query with one token needs no query vector (its softmax is 1) and its update is a single
        product with the output and value projections folded together; the others' attended
        values go through the output projection together.
        """
        total, channels, height, width = hidden.shape
        views = geometry.num_views
        if channels != self.dim or (height, width) != (geometry.height, geometry.width) or total % views:
            raise ValueError(
                f"features {tuple(hidden.shape)} do not match the block (dim {self.dim}) and its geometry "
                f"({views} views of {geometry.height}x{geometry.width})"
            )
        batch, pixels = total // views, height * width
        # Features pixel-major, one row per (sample, view, pixel): what the token lookups read.
        table = hidden.view(batch, views, channels, pixels).transpose(2, 3).reshape(-1, channels)
        x = table.view(batch, views * pixels, channels)
        buckets = geometry.buckets(drop_invalid=self.mask_invalid, dtype=x.dtype)
        projections = self._token_projections()
        updates = []
        for bucket in buckets:
            if bucket.tokens == 1:
                rows = x.new_empty(batch, len(bucket.queries), channels)
                self._attend_bucket(None, table, bucket, views * pixels, projections, rows)
                updates.append((bucket.queries, rows))
        attending = [bucket for bucket in buckets if bucket.tokens > 1]
        if attending:
            asking = torch.cat([bucket.queries for bucket in attending])
            first = geometry.groups()[0][1]
            query_encoding = self.encoding(first.encoding_input.new_zeros(first.encoding_input.shape[-1]))
            q = linear(self.norm1(x[:, asking] + query_encoding.to(x.dtype)), self.to_q.weight)
            q = q.view(batch, -1, self.heads, HEAD_DIM)
            attended = x.new_empty(batch, len(asking), channels)
            done = 0
            for bucket in attending:
                count = len(bucket.queries)
                bucket_q, bucket_out = q[:, done:done + count], attended[:, done:done + count]
                self._attend_bucket(bucket_q, table, bucket, views * pixels, projections, bucket_out)
                done += count
            # The values' constant part goes through the output projection once, as part of its bias.
            updates.append((asking, linear(attended, self.to_out.weight, projections.output_bias)))
        return x, updates

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + FF(LN(x))`` for rows of ``x`` (Q, C), in blocks of rows; ``x`` may be overwritten.

        The feed-forward's hidden layer is eight times as wide as the block; over a whole level
        it falls out of the caches, in blocks of rows it stays in them (about twice as fast on
        a CPU at the widest level).
        """
        rows = max(FEED_FORWARD_ROWS, FEED_FORWARD_ELEMENTS // (8 * self.dim))
        if not self.ff.takes_scratch(x):
            if x.shape[0] <= rows:
                return x + self.ff(self.norm2(x))
            out = torch.empty_like(x)
            for start in range(0, x.shape[0], rows):
                part = x[start:start + rows]
                torch.add(part, self.ff(self.norm2(part)), out=out[start:start + rows])
            return out
        # Without autograd the result overwrites ``x`` block by block (each block's LayerNorm is
        # taken before its rows are overwritten).
        width, block = self.ff.out.in_features, min(rows, x.shape[0])
        scratch = x.new_empty(2, width * block)
        transposed = block <= FEED_FORWARD_TRANSPOSED_ROWS
        for start in range(0, x.shape[0], rows):
            part = x[start:start + rows]
            shape = (width, part.shape[0]) if transposed else (part.shape[0], width)
            hidden, gate = (buffer[: width * part.shape[0]].view(shape) for buffer in scratch)
            self.ff.residual_into(self.norm2(part), part, part, hidden, gate, transposed)
        return x

    def _attend_bucket(
        self,
        q: torch.Tensor | None,
        table: torch.Tensor,
        bucket: TokenBucket,
        sample_rows: int,
        projections: Projections,
        out: torch.Tensor,
    ) -> None:
        """Attention of queries ``q`` (B, N, heads, d) over the bucket's key tokens, written to ``out`` (B, N, C).

        ``table`` holds the level's features, one row per (sample, view, pixel), ``sample_rows``
        rows per sample. Keys and values are the LayerNorm-ed samples plus encodings; ``out``
        gets the attended values without their constant part ``W_v beta``, except for a bucket
        of one token, which gets the update itself (output projection and bias included).
        """
        batch, queries, channels = out.shape
        tokens = bucket.tokens
        # A chunk takes the same queries of every sample: one lookup and one set of products for
        # all of them (larger products, and on wide levels the weights read once per chunk).
        plan = plan_attention(batch * queries, tokens, channels, self.heads, table.dtype, table.device)
        step = max(1, plan.chunk // batch)
        attend = _ATTEND[plan.form]
        encodings = bucket.encoded(self.encoding)
        offsets = torch.arange(batch, device=table.device, dtype=bucket.rows.dtype).mul_(sample_rows).view(-1, 1, 1, 1)
        # A unit gain and zero shift change no value, but put the CPU's LayerNorm on its vectorised path
        # (twice as fast as without an affine part at these widths).
        unit_gain, zero_shift = table.new_ones(channels), table.new_zeros(channels)
        for start in range(0, queries, step):
            stop = min(start + step, queries)
            n = stop - start
            rows = bucket.rows[start:stop] + offsets
            weights = bucket.weights[start:stop].expand(batch, -1, -1, -1)
            sampled = _lookup(table, rows.reshape(-1, tokens, 4), weights.reshape(-1, tokens, 4), plan)
            encoding = encodings[start:stop] if encodings is not None else bucket.encode(self.encoding, start, stop)
            sampled.view(batch, n, tokens, channels).add_(encoding)
            # The keys' LayerNorm without its affine part (folded into the projections);
            # its statistics are float32 whatever the working dtype.
            normalised = F.layer_norm(sampled, (channels,), unit_gain, zero_shift, LAYER_NORM_EPS)
            chunk_q = q[:, start:stop].reshape(batch * n, self.heads, HEAD_DIM) if q is not None else None
            out[:, start:stop] = attend(chunk_q, normalised, projections, plan).view(batch, n, channels)

    def _token_projections(self) -> Projections:
        """The projections as the attention over normalised tokens uses them, kept until the weights change.

        ``W diag(gamma)`` maps normalised keys straight to projected ones; ``W_v beta`` is what
        the LayerNorm's shift adds to every value, and it reaches the output through the output
        projection's bias. The keys' matrix also carries the softmax scale ``1 / sqrt(d)``.
        """
        sources = (self.to_k.weight, self.to_v.weight, self.norm1.weight, self.norm1.bias, self.to_out.weight,
                   self.to_out.bias)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if self._projections is not None and self._projections[0] == key and not _records_grad(sources):
            return self._projections[1]
        gamma, beta = self.norm1.weight, self.norm1.bias
        stacked = torch.cat([self.to_k.weight * (1.0 / math.sqrt(HEAD_DIM)), self.to_v.weight]) * gamma
        value_bias = self.to_v(beta)
        values = stacked[self.dim :]
        exact = torch.promote_types(values.dtype, torch.float32)  # half types multiply in float32
        output_values = (self.to_out.weight.to(exact) @ values.to(exact)).to(values.dtype)
        projections = Projections(
            stacked[: self.dim], values, stacked, self.to_out.bias + self.to_out.weight @ value_bias, output_values
        )
        if not _records_grad(sources):
            self._projections = (key, projections)
        return projections

    def _apply(self, fn, recurse: bool = True):
        self._projections = None
        return super()._apply(fn, recurse)


class Projections(NamedTuple):
    """A block's key and value matrices over normalised tokens (C x C each, keys scaled for the
    softmax), both stacked (2C x C), the output projection's bias with the values' constant part
    added, and the output projection times the values' matrix (a one-token query's whole update,
    products taken in float32)."""

    keys: torch.Tensor
    values: torch.Tensor
    stacked: torch.Tensor
    output_bias: torch.Tensor
    output_values: torch.Tensor


def _records_grad(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether autograd is recording through these tensors (then nothing derived from them is kept)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _lookup(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Bilinear samples (n, T, C) of ``table`` rows: each token the weighted sum of its four taps."""
    n, tokens, _ = rows.shape
    if plan.lookup == "embedding_bag":
        flat = F.embedding_bag(rows.reshape(-1, 4), table, per_sample_weights=weights.reshape(-1, 4), mode="sum")
        return flat.view(n, tokens, -1)
    return torch.einsum("ntk,ntkc->ntc", weights, table[rows.long()])


def _attend_one_token(q, normalised, projections: Projections, plan: AttentionPlan) -> torch.Tensor:
    """One token per query: its softmax weight is 1, so every head's value is the token's, and the
    update is ``W_o W_v zhat + b``: one dense product, the output projection included."""
    return linear(normalised[:, 0], projections.output_values, projections.output_bias)


def _attend_input_space(q, normalised, projections: Projections, plan: AttentionPlan) -> torch.Tensor:
    """Each head's query moved into input space and scored against the normalised tokens.

    The heads act as the query rows of one attention over the query's own tokens, so all heads
    share one read of the tokens; the heads' weighted token averages are then projected per head.
    Logits are laid out token-major, (n, T, heads): a product with a few output columns and a
    softmax over a last dimension of a few elements are both slow on a CPU, and this way the
    product's columns are the heads and the softmax runs across rows, vectorised over heads.
    """
    n, heads, _ = q.shape
    w_k, w_v = (w.view(heads, HEAD_DIM, -1) for w in (projections.keys, projections.values))
    # Per-head products as batched products over the heads: one (n x d) by (d x C) product each.
    q_in = torch.bmm(q.transpose(0, 1), w_k)  # (heads, n, C), the softmax scale folded into w_k
    if plan.fused:
        tokens = normalised[:, None]
        mixed = F.scaled_dot_product_attention(q_in.transpose(0, 1)[:, None], tokens, tokens, scale=1.0)[:, 0]
    else:
        logits = torch.bmm(normalised, q_in.permute(1, 2, 0))  # (n, T, heads)
        mixed = torch.bmm(logits.softmax(dim=1).transpose(1, 2), normalised)  # (n, heads, C): per-head averages
    return torch.bmm(mixed.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(n, -1)


def _attend_differences(q, normalised, projections: Projections, plan: AttentionPlan) -> torch.Tensor:
    """Keys and values taken relative to the last token: ``v_last + sum_t p_t (v_t - v_last)``.

    The softmax does not change when every logit moves by ``q . k_last``, and the weights sum
    to one, so only the differences ``zhat_t - zhat_last`` need keys and values, and the last
    token a value: ``(4 T - 2) C^2`` flops per query in two large products against the
    per-token form's ``4 T C^2``, and no attention kernel. With two tokens the softmax is the
    sigmoid of the one logit. Logits, weights and the weighted sum are float32 whatever the
    working dtype, as in the fused kernel.
    """
    n, heads, _ = q.shape
    tokens = normalised.shape[1]
    last = normalised[:, -1]
    kv = linear(normalised[:, :-1] - last[:, None], projections.stacked).view(n, tokens - 1, 2, heads, HEAD_DIM)
    exact = torch.promote_types(q.dtype, torch.float32)
    logits = (kv[:, :, 0].to(exact) * q[:, None].to(exact)).sum(-1)  # (n, T - 1, heads); the last token's is 0
    if tokens == 2:
        weights = logits.sigmoid_()
    else:
        top = logits.amax(dim=1, keepdim=True).clamp_min_(0.0)
        weights = logits.sub_(top).exp_()
        weights = weights.div_(weights.sum(dim=1, keepdim=True).add_(top.neg_().exp_()))
    # The weighted sum is float32 too (at least: a no-op in float32 and float64); in half
    # precision it would round once per token where the fused kernel rounds once.
    values = linear(last, projections.values).view(n, heads, HEAD_DIM).to(exact)
    if tokens == 2:
        values.addcmul_(kv[:, 0, 1].to(exact), weights[:, 0, :, None])
    else:
        values.add_((kv[:, :, 1].to(exact) * weights[..., None]).sum(dim=1))
    return values.to(q.dtype).view(n, -1)


def _attend_per_token(q, normalised, projections: Projections, plan: AttentionPlan) -> torch.Tensor:
    """Every token projected to keys and values in one matrix product, then a fused attention."""
    n, heads, _ = q.shape
    tokens = normalised.shape[1]
    kv = linear(normalised, projections.stacked).view(n, tokens, 2, heads, HEAD_DIM)
    keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (n, heads, T, d)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=1.0)  # the scale is in the keys
    return out.reshape(n, -1)


_ATTEND = {
    "input_space": _attend_input_space,
    "per_token": _attend_per_token,
    "one_token": _attend_one_token,
    "differences": _attend_differences,
}


class ZeroResNet(nn.Module):
    """GN -> ReLU -> conv3x3 -> GN -> ReLU -> conv3x3 (zero-initialised) plus identity.

    Follows each CAA block of the depth task; starts as the identity. ``groups`` follows the
    UNet's own normalisation (SD 2: 32). Its convolutions run in Winograd form for CPU inference
    (:mod:`~backend.models.winograd`): they are half of the depth design's added arithmetic.
    """

    def __init__(self, dim: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim)
        self.conv1 = WinogradConv3x3(dim, dim)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.conv2 = WinogradConv3x3(dim, dim)
        nn.init.zeros_(self.conv2.weight)

    def prefers_channels_last(self, hidden: torch.Tensor) -> bool:
        """Whether the ResNet runs faster on channels-last features (what the attention leaves behind)."""
        height, width = hidden.shape[-2:]
        return self.conv1.uses_winograd(hidden) or resnet_channels_last(height, width, hidden.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x), inplace=True))
        return self.conv2(F.relu(self.norm2(h), inplace=True), residual=x)


class CAABlock(nn.Module):
    """A CAA block as placed in the UNet: attention, then (depth task) a zero-initialised ResNet."""

    def __init__(
        self, dim: int, encoding_inputs: int, with_resnet: bool, mask_invalid: bool = True, groups: int = 32
    ):
        super().__init__()
        self.attention = CorrespondenceAttention(dim, encoding_inputs, mask_invalid)
        self.resnet = ZeroResNet(dim, groups) if with_resnet else None

    def forward(self, hidden: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        if self.resnet is None:
            return self.attention(hidden, geometry)
        if self.resnet.prefers_channels_last(hidden):
            return same_layout(self.resnet(self.attention.channels_last(hidden, geometry)), hidden)
        return self.resnet(self.attention(hidden, geometry))


def same_layout(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` in ``like``'s memory layout, so the kernels after a block run exactly as without it."""
    return result if result.stride() == like.stride() else torch.empty_like(like).copy_(result)
