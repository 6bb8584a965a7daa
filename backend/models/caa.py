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
views of a level in large matrix products; only the attention over key tokens runs per group of
views (:class:`~backend.models.caa_tokens.ViewGroups`) and in chunks. Bilinear lookups are one
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

import torch
import torch.nn.functional as F
from torch import nn

from .caa_plan import AttentionPlan, plan_attention, resnet_channels_last
from .caa_tokens import KeyTokens, LevelGeometry, ViewGroups
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
        # Two products rather than one split in halves: the halves of one product are strided
        # views, on which a CPU's GELU and multiply run five and two times slower.
        width = self.out.in_features
        weight, bias = self.proj.weight, self.proj.bias
        hidden = linear(x, weight[:width], bias[:width])
        gate = F.gelu(linear(x, weight[width:], bias[width:]))
        return linear(hidden.mul_(gate), self.out.weight, self.out.bias)


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

    def forward(self, hidden: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """``hidden`` (B * V, C, h, w), views of one sample consecutive -> the same shape and layout."""
        return same_layout(self.channels_last(hidden, geometry), hidden)

    def channels_last(self, hidden: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """The block's output as (B * V, C, h, w) with channels-last memory: how it is computed, uncopied."""
        total, channels, height, width = hidden.shape
        x, update = self.attention_update(hidden, geometry)
        x = self._feed_forward((x + update).view(-1, channels))
        return x.view(total, height, width, channels).permute(0, 3, 1, 2)

    def attention_update(self, hidden: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
        """The features pixel-major (B, V, P, C) and what the attention adds to them, before the feed-forward.

        Pixels without a valid correspondence get no update when invalid keys are masked.
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
        x = table.view(batch, views, pixels, channels)
        groups = geometry.groups()
        first = groups[0][1]
        query_encoding = self.encoding(first.encoding_input.new_zeros(first.encoding_input.shape[-1]))
        q = linear(self.norm1(x + query_encoding.to(x.dtype)), self.to_q.weight)
        q = q.view(batch, views, pixels, self.heads, HEAD_DIM)
        attended = torch.empty_like(x) if len(groups) > 1 else None
        attends = torch.ones(views, pixels, 1, dtype=torch.bool, device=x.device) if self.mask_invalid else None
        projections = self._input_space_projections()
        for owners, part in groups:
            keys = part.key_tokens(drop_invalid=self.mask_invalid, dtype=x.dtype)
            group_q = q if owners is None else q[:, owners]
            result = self._attend_tokens(group_q, table, keys, views * pixels, projections)
            if attended is None:
                attended = result
            else:
                attended[:, owners] = result
            if attends is not None:
                has = keys.valid.any(dim=-1, keepdim=True)
                if owners is None:
                    attends = has
                else:
                    attends[owners] = has
        # The values' constant part goes through the output projection once, as part of its bias.
        value_bias = projections[2]
        update = linear(attended, self.to_out.weight, self.to_out.bias + self.to_out.weight @ value_bias)
        if attends is not None:
            update = update.mul_(attends.to(x.dtype))
        return x, update

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + FF(LN(x))`` for rows of ``x`` (Q, C), in blocks of rows.

        The feed-forward's hidden layer is eight times as wide as the block; over a whole level
        it falls out of the caches, in blocks of rows it stays in them (about twice as fast on
        a CPU at the widest level).
        """
        rows = max(FEED_FORWARD_ROWS, FEED_FORWARD_ELEMENTS // (8 * self.dim))
        if x.shape[0] <= rows:
            return x + self.ff(self.norm2(x))
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], rows):
            part = x[start:start + rows]
            out[start:start + rows] = part + self.ff(self.norm2(part))
        return out

    def _attend_tokens(
        self,
        q: torch.Tensor,
        table: torch.Tensor,
        keys: KeyTokens,
        sample_rows: int,
        projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention of queries ``q`` (B, V', P, heads, d) over their key tokens ``keys``.

        ``table`` holds the level's features, one row per (sample, view, pixel), ``sample_rows``
        rows per sample. Keys and values are the LayerNorm-ed samples plus encodings. Returns the
        attended values (B, V', P, C) without their constant part ``W_v beta``.
        """
        batch, views, pixels = q.shape[:3]
        tokens, channels, queries = keys.count, self.dim, views * pixels
        plan = plan_attention(queries, tokens, channels, self.heads, table.dtype, table.device)
        # Queries flattened over (view, pixel): every chunk below is a contiguous slice of each
        # per-query array, so nothing is copied to line chunks up.
        rows, weights = keys.rows.view(queries, tokens, 4), keys.weights.view(queries, tokens, 4)
        logit_bias = keys.logit_bias.view(queries, 1, tokens) if self.mask_invalid else None
        encodings = keys.encoded(self.encoding)
        q = q.reshape(batch, queries, self.heads, HEAD_DIM)
        attended = torch.empty(batch, queries, channels, dtype=table.dtype, device=table.device)
        for sample in range(batch):
            for start in range(0, queries, plan.chunk):
                stop = min(start + plan.chunk, queries)
                sampled = _lookup(table, rows[start:stop] + sample * sample_rows, weights[start:stop], plan)
                encoding = encodings[start:stop] if encodings is not None else keys.encode(self.encoding, start, stop)
                # The keys' LayerNorm without its affine part (folded into the projections);
                # its statistics are float32 whatever the working dtype.
                normalised = F.layer_norm(sampled.add_(encoding), (channels,), eps=LAYER_NORM_EPS)
                bias = logit_bias[start:stop] if logit_bias is not None else None
                attend = _ATTEND[plan.form]
                attended[sample, start:stop] = attend(q[sample, start:stop], normalised, bias, projections, plan)
        return attended.view(batch, views, pixels, channels)

    def _input_space_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key and value matrices with the LayerNorm gain folded in (C, C each), the value bias, and
        both matrices stacked (2C, C) for the per-token form.

        ``W diag(gamma)`` maps normalised keys straight to projected ones; ``W_v beta`` is what
        the LayerNorm's shift adds to every value. Computed once per block call, not per chunk.
        """
        gamma, beta = self.norm1.weight, self.norm1.bias
        stacked = torch.cat([self.to_k.weight, self.to_v.weight]) * gamma
        return stacked[: self.dim], stacked[self.dim :], self.to_v(beta), stacked


def _lookup(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Bilinear samples (n, T, C) of ``table`` rows: each token the weighted sum of its four taps."""
    n, tokens, _ = rows.shape
    if plan.lookup == "embedding_bag":
        flat = F.embedding_bag(rows.reshape(-1, 4), table, per_sample_weights=weights.reshape(-1, 4), mode="sum")
        return flat.view(n, tokens, -1)
    return torch.einsum("ntk,ntkc->ntc", weights, table[rows.long()])


def _attend_input_space(q, normalised, bias, projections, plan: AttentionPlan) -> torch.Tensor:
    """Each head's query moved into input space and scored against the normalised tokens.

    The heads act as the query rows of one attention over the query's own tokens, so all heads
    share one read of the tokens; the heads' weighted token averages are then projected per head.
    """
    n, heads, _ = q.shape
    w_k, w_v = (w.view(heads, HEAD_DIM, -1) for w in projections[:2])
    # Per-head products as batched products over the heads: one (n x d) by (d x C) product each.
    q_in = torch.bmm(q.transpose(0, 1), w_k).transpose(0, 1)  # (n, heads, C)
    if plan.fused:
        mask = bias[:, None] if bias is not None else None
        mixed = F.scaled_dot_product_attention(
            q_in[:, None], normalised[:, None], normalised[:, None], attn_mask=mask, scale=1.0 / math.sqrt(HEAD_DIM)
        )[:, 0]
    else:
        logits = torch.bmm(q_in, normalised.transpose(1, 2)).mul_(1.0 / math.sqrt(HEAD_DIM))  # (n, heads, T)
        if bias is not None:
            logits = logits.add_(bias)
        mixed = torch.bmm(logits.softmax(dim=-1), normalised)  # (n, heads, C): per-head averages
    return torch.bmm(mixed.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(n, -1)


def _attend_per_token(q, normalised, bias, projections, plan: AttentionPlan) -> torch.Tensor:
    """Every token projected to keys and values in one matrix product, then a fused attention."""
    n, heads, _ = q.shape
    tokens = normalised.shape[1]
    kv = linear(normalised, projections[3]).view(n, tokens, 2, heads, HEAD_DIM)
    keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (n, heads, T, d)
    mask = bias[:, None] if bias is not None else None
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=1.0 / math.sqrt(HEAD_DIM))
    return out.reshape(n, -1)


_ATTEND = {"input_space": _attend_input_space, "per_token": _attend_per_token}


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
        return x + self.conv2(F.relu(self.norm2(h), inplace=True))


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
