"""Correspondence-aware attention (CAA): each pixel attends to what its neighbour views see there.

Every query pixel of view i attends to a handful of key tokens: bilinear samples of neighbour
views' feature maps at (and around) its correspondences, each with a positional encoding of the
displacement (panoramas) or the depth disagreement (scenes) added. The block is a transformer
block (LayerNorm, attention, GEGLU feed-forward) whose output projection and last feed-forward
layer start at zero, so a new block is exactly the identity.

Exact fast form. The released design projects every gathered token through full dim x dim key and
value matrices (18 tokens per pixel in a panorama). With ``z_t = sample_t + pe_t`` and
``LN(z) = gamma * zhat + beta``:

* logits: ``q . W_k LN(z_t) = (W_k gamma)^T q . zhat_t + q . W_k beta``; the last term is the
  same for every token of a query and cancels in the softmax, so each head's query is moved into
  input space once (``qtilde = (W_k diag gamma)^T q``) and scored against the normalised samples.
* values: ``sum_t a_t W_v LN(z_t) = (W_v diag gamma) sum_t a_t zhat_t + W_v beta`` (weights sum
  to one), so tokens are averaged in input space and projected once per query.

Per query that is two dim x dim products instead of 2 x 18, for both the clean mode and the
released code's behaviour, with the positional encoding included exactly.

Bilinear lookups. Every key token is a weighted sum of four feature vectors (its bilinear taps).
The taps' rows and weights depend only on the geometry, so they are worked out once per job and
the lookups run as one ``embedding_bag`` over the features stored pixel-major: it writes each
token's vector straight into (pixel, token, channel) order and reads whole contiguous rows, where
``grid_sample`` on channel-major maps reads one strided float per channel and its output still
has to be transposed. On the CPU that is four to eight times faster for the same numbers.

What is left per (query, token) is memory traffic, so it is kept small: tokens without a valid
correspondence are dropped rather than masked (a panorama pixel lies in one of its two ring
neighbours, so half the tokens go); the keys' LayerNorm stays factored (centred tokens and one
scale per token, never a normalised copy); and the work runs in cache-sized chunks, as does the
feed-forward, whose hidden layer is eight times the block's width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 32
LAYER_NORM_EPS = 1e-5
CHUNK_ELEMENTS = 2**20  # query pixels x key tokens x channels per chunk: 4 MB fp32 stays in cache
FEED_FORWARD_ROWS = 1024  # fewest query rows per feed-forward block
ENCODING_CACHE_ELEMENTS = 64 * 2**20  # key encodings kept per level between steps (256 MB fp32)


@dataclass
class KeyTokens:
    """Per query pixel, its key tokens as bilinear taps into the level's features.

    ``rows`` (V, P, T, 4) int32 index one sample's features laid out as (view * h * w + y * w + x,
    channel); ``weights`` (V, P, T, 4) are the bilinear weights (0 for a tap outside the map);
    ``valid`` (V, P, T); ``encoding_input`` (V, P, T, E). ``zero_invalid``: invalid tokens are
    zero vectors, encoding included, rather than masked out.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    encoding_input: torch.Tensor
    zero_invalid: bool
    _encodings: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.valid.shape[2]

    def __post_init__(self):
        # -inf for invalid tokens; rows without any valid token stay all 0, so their softmax is
        # finite (the block drops their attention update). Added to the logits of every step.
        usable = self.valid | ~self.valid.any(dim=-1, keepdim=True)
        bias = torch.zeros(self.valid.shape, dtype=self.weights.dtype, device=self.valid.device)
        self.logit_bias = bias.masked_fill_(~usable, float("-inf"))

    def encoded(self, encoding: SinusoidalEncoding) -> torch.Tensor | None:
        """The key encodings (V * P, T, C) for ``encoding``, computed once and kept, if small enough.

        They depend only on the geometry, so every step and both blocks of a level share them.
        """
        key = (encoding.key, self.encoding_input.dtype, self.encoding_input.device)
        if key not in self._encodings:
            small = self.encoding_input[..., 0].numel() * encoding.dim <= ENCODING_CACHE_ELEMENTS
            self._encodings[key] = self.encode(encoding) if small else None
        return self._encodings[key]

    def encode(self, encoding: SinusoidalEncoding, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Key encodings (Q, T, C) of the queries ``start:stop`` over (view, pixel), not cached."""
        views, pixels, tokens = self.valid.shape
        encoded = encoding(self.encoding_input.view(views * pixels, tokens, -1)[start:stop])
        return encoded * self.valid.view(views * pixels, tokens, 1)[start:stop] if self.zero_invalid else encoded


@dataclass
class LevelGeometry:
    """Where every query pixel of one UNet level finds its key tokens; computed once per job.

    Shapes use V views, P = h * w query pixels, N neighbour slots per view, S samples per slot
    (K x K) and T = N * S key tokens per pixel (slot-major). ``source_view`` (V, N) long: the
    view each slot reads (any view for an unused slot); ``grid`` (V, N, P, S, 2) float:
    ``grid_sample`` coordinates (``align_corners=False``, zero padding) in that view's level
    features; ``valid`` (V, P, T) bool; ``encoding_input`` (V, P, T, E) float: what the positional
    encoding encodes (E = 2: displacement in query pixels; E = 1: relative depth error).
    """

    height: int
    width: int
    source_view: torch.Tensor
    grid: torch.Tensor
    valid: torch.Tensor
    encoding_input: torch.Tensor
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)

    def key_tokens(self, drop_invalid: bool) -> KeyTokens:
        """The key tokens in the form the attention reads, worked out once per job and kept.

        ``drop_invalid`` leaves out tokens without a valid correspondence (they are masked out of
        the softmax anyway): each pixel's valid tokens come first and the list is cut at the
        largest count any pixel has. A panorama view sees each pixel in one of its two ring
        neighbours, so this halves the token work. Without it (the released behaviour) invalid
        tokens stay, as zero vectors: their taps and encodings are zeroed.
        """
        key = (drop_invalid, self.grid.device, self.grid.dtype)
        if key not in self._tokens:
            rows, weights = self._taps()
            valid, encoding_input = self.valid, self.encoding_input
            if drop_invalid:
                kept = max(1, int(valid.sum(dim=-1).max()))
                order = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)[..., :kept]
                rows, weights, encoding_input = (
                    t.gather(2, order[..., None].expand(*order.shape, t.shape[-1]))
                    for t in (rows, weights, encoding_input)
                )
                valid = valid.gather(2, order)
            else:
                weights = weights * valid[..., None]
            self._tokens[key] = KeyTokens(rows, weights, valid, encoding_input, zero_invalid=not drop_invalid)
        return self._tokens[key]

    def _taps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each key token's four bilinear taps: rows (V, P, T, 4) int32 and weights (V, P, T, 4).

        Rows index one sample's features laid out as (view * h * w + y * w + x, channel); a tap
        outside the map gets weight 0 (``grid_sample``'s zero padding) and a row inside it.
        """
        views, slots, pixels, samples, _ = self.grid.shape
        grid = self.grid.permute(0, 2, 1, 3, 4).reshape(views, pixels, slots * samples, 2).double()
        x = ((grid[..., 0] + 1.0) * self.width - 1.0) / 2.0  # align_corners=False
        y = ((grid[..., 1] + 1.0) * self.height - 1.0) / 2.0
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        xs, ys = torch.stack([x0, x0 + 1, x0, x0 + 1], -1), torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
        weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
        inside = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
        source = self.source_view[:, None, :, None].expand(-1, pixels, -1, samples).reshape(views, pixels, -1)
        rows = (source[..., None] * self.height + ys.clamp(0, self.height - 1).long()) * self.width
        rows = rows + xs.clamp(0, self.width - 1).long()
        return rows.to(torch.int32), torch.where(inside, weights, 0.0).to(self.grid.dtype)

    @property
    def num_views(self) -> int:
        return self.source_view.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.valid.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LevelGeometry:
        return LevelGeometry(
            self.height,
            self.width,
            self.source_view.to(device),
            self.grid.to(device, dtype),
            self.valid.to(device),
            self.encoding_input.to(device, dtype),
        )


class SinusoidalEncoding(nn.Module):
    """sin/cos of each input scalar at ``dim // (2 * inputs)`` geometric frequencies, concatenated.

    Layout: all sines (input 0 over frequencies, then input 1, ...), then all cosines, so the
    encoding of 0 is ``[0 ... 0, 1 ... 1]``. Frequencies run from 1 to ``2 ** octaves`` radians per
    unit: displacements of a fraction of a pixel and depth errors of a few percent stay distinct.
    """

    def __init__(self, dim: int, inputs: int, octaves: float = 6.0):
        super().__init__()
        if dim % (2 * inputs):
            raise ValueError(f"dim {dim} must be a multiple of {2 * inputs}")
        count = dim // (2 * inputs)
        self.dim, self.key = dim, ("sinusoidal", dim, inputs, octaves)
        self.register_buffer("freq_bands", 2.0 ** torch.linspace(0.0, octaves, count), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        angles = (values[..., :, None] * self.freq_bands).flatten(-2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class GEGLUFeedForward(nn.Module):
    """dim -> 4 dim (GELU-gated) -> dim, the feed-forward of Stable Diffusion's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(hidden * F.gelu(gate))


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

    def forward(self, hidden: torch.Tensor, geometry: LevelGeometry) -> torch.Tensor:
        """``hidden`` (B * V, C, h, w), views of one sample consecutive -> the same shape."""
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
        # Everything per query runs once over the whole level in large matrix products; only the
        # work per (query, key token) goes through cache-sized chunks.
        query_encoding = self.encoding(torch.zeros_like(geometry.encoding_input[0, 0, 0]))
        q = self.to_q(self.norm1(x + query_encoding)).view(batch, views, pixels, self.heads, HEAD_DIM)
        attended, value_bias = self._attend_tokens(q, table, geometry)
        # The values' constant part goes through the output projection once, as part of its bias.
        update = F.linear(attended, self.to_out.weight, self.to_out.bias + self.to_out.weight @ value_bias)
        if self.mask_invalid:
            # A pixel with no valid correspondence has nothing to attend to: no attention update.
            x = torch.addcmul(x, update, geometry.valid.any(dim=-1, keepdim=True).to(x.dtype))
        else:
            x = x + update
        x = self._feed_forward(x.view(-1, channels)).view(x.shape)
        # Same memory layout as the input: downstream kernels then run exactly as without CAA.
        result = x.transpose(2, 3).reshape(total, channels, height, width)
        return result if result.stride() == hidden.stride() else torch.empty_like(hidden).copy_(result)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + FF(LN(x))`` for rows of ``x`` (Q, C), in blocks of rows.

        The feed-forward's hidden layer is eight times as wide as the block; over a whole level
        it falls out of the caches, in blocks of rows it stays in them (about twice as fast on
        a CPU at the widest level).
        """
        rows = max(FEED_FORWARD_ROWS, CHUNK_ELEMENTS // (8 * self.dim))
        if x.shape[0] <= rows:
            return x + self.ff(self.norm2(x))
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], rows):
            part = x[start:start + rows]
            out[start:start + rows] = part + self.ff(self.norm2(part))
        return out

    def _attend_tokens(
        self, q: torch.Tensor, table: torch.Tensor, geometry: LevelGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of queries ``q`` (B, V, P, heads, d) over their key tokens.

        ``table`` holds the level's features, one row per (sample, view, pixel). Keys and values
        are the LayerNorm-ed samples plus encodings. Returns the attended values (B, V, P, C)
        without their constant part, and that part (``W_v beta``, the same for every query).
        """
        batch, views, pixels = q.shape[:3]
        keys = geometry.key_tokens(drop_invalid=self.mask_invalid)
        tokens, channels, queries = keys.count, self.dim, views * pixels
        # Queries of one sample, flattened over (view, pixel): every chunk below is a contiguous
        # slice of each per-query array, so nothing is copied to line chunks up.
        rows, weights = keys.rows.view(queries, tokens, 4), keys.weights.view(queries, tokens, 4)
        logit_bias = keys.logit_bias.view(queries, 1, tokens)
        encodings = keys.encoded(self.encoding)
        w_k, w_v, value_bias = self._input_space_projections()
        q = q.view(batch, queries, self.heads, HEAD_DIM)
        attended = torch.empty(batch, queries, channels, dtype=table.dtype, device=table.device)
        chunk = max(1, CHUNK_ELEMENTS // (tokens * channels))
        for sample in range(batch):
            for start in range(0, queries, chunk):
                stop = min(start + chunk, queries)
                taps = (rows[start:stop] + sample * queries).view(-1, 4)
                sampled = F.embedding_bag(
                    taps, table, per_sample_weights=weights[start:stop].view(-1, 4), mode="sum"
                ).view(stop - start, tokens, channels)
                encoding = encodings[start:stop] if encodings is not None else keys.encode(self.encoding, start, stop)
                z = sampled.add_(encoding)
                # The keys' LayerNorm, kept factored: centred tokens and one scale per token, which
                # multiplies the logits and the attention weights instead of every channel.
                centred = z.sub_(z.mean(dim=-1, keepdim=True))
                scale = (torch.linalg.vector_norm(centred, dim=-1).square() / channels + LAYER_NORM_EPS).rsqrt()
                scale = scale.unsqueeze(1)  # (Q, 1, T)
                # Each head's query moved into input space (key matrix and LayerNorm gain folded in).
                q_in = torch.einsum("nhd,hdc->nhc", q[sample, start:stop], w_k)
                # One query per sequence and a handful of keys shared by all heads: two batched
                # matrix products beat the fused attention kernels here (which also cap head sizes).
                logits = torch.bmm(q_in, centred.transpose(1, 2)).mul_(scale / math.sqrt(HEAD_DIM))  # (Q, heads, T)
                if self.mask_invalid:
                    logits = logits.add_(logit_bias[start:stop])
                attention = logits.softmax(dim=-1)
                # In place at inference; training needs the softmax output intact for its backward.
                attention = attention * scale if torch.is_grad_enabled() else attention.mul_(scale)
                mixed = torch.bmm(attention, centred)  # (Q, heads, C): per-head averages
                attended[sample, start:stop] = torch.einsum("nhc,hdc->nhd", mixed, w_v).reshape(-1, channels)
        return attended.view(batch, views, pixels, channels), value_bias

    def _input_space_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key and value matrices with the LayerNorm gain folded in, per head, and the value bias.

        ``W diag(gamma)`` maps normalised keys straight to projected ones; ``W_v beta`` is what
        the LayerNorm's shift adds to every value. Computed once per block call, not per chunk.
        """
        gamma, beta = self.norm1.weight, self.norm1.bias
        w_k = (self.to_k.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        w_v = (self.to_v.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        return w_k, w_v, self.to_v(beta)


class ZeroResNet(nn.Module):
    """GN -> ReLU -> conv3x3 -> GN -> ReLU -> conv3x3 (zero-initialised) plus identity.

    Follows each CAA block of the depth task; starts as the identity. ``groups`` follows the
    UNet's own normalisation (SD 2: 32).
    """

    def __init__(self, dim: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(h)))


class CAABlock(nn.Module):
    """A CAA block as placed in the UNet: attention, then (depth task) a zero-initialised ResNet."""

    def __init__(
        self, dim: int, encoding_inputs: int, with_resnet: bool, mask_invalid: bool = True, groups: int = 32
    ):
        super().__init__()
        self.attention = CorrespondenceAttention(dim, encoding_inputs, mask_invalid)
        self.resnet = ZeroResNet(dim, groups) if with_resnet else None

    def forward(self, hidden: torch.Tensor, geometry: LevelGeometry) -> torch.Tensor:
        hidden = self.attention(hidden, geometry)
        return self.resnet(hidden) if self.resnet is not None else hidden
