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
ENCODING_CACHE_ELEMENTS = 64 * 2**20  # key encodings kept per level between steps (256 MB fp32)


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
    _encodings: dict = field(default_factory=dict, repr=False, compare=False)

    def encoded(self, encoding: SinusoidalEncoding) -> torch.Tensor | None:
        """The key encodings (V, P, T, C) for ``encoding``, computed once and kept, if small enough.

        They depend only on the geometry, so every step and both blocks of a level share them.
        """
        key = (encoding.key, self.encoding_input.dtype, self.encoding_input.device)
        if key not in self._encodings:
            small = self.encoding_input[..., 0].numel() * encoding.dim <= ENCODING_CACHE_ELEMENTS
            self._encodings[key] = encoding(self.encoding_input) if small else None
        return self._encodings[key]

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
        slots, samples = geometry.grid.shape[1], geometry.grid.shape[3]
        # Each (view, slot) reads one source view: stack those maps so one grid_sample call does
        # every bilinear lookup of the level (zero outside, as the tokens' validity assumes).
        features = hidden.view(batch, views, channels, height, width)
        sources = features[:, geometry.source_view.reshape(-1)].reshape(batch * views * slots, channels, height, width)
        queries = hidden.view(batch, views, channels, pixels).transpose(2, 3)  # (B, V, P, C)
        encodings = geometry.encoded(self.encoding)
        query_encoding = self.encoding(torch.zeros_like(geometry.encoding_input[0, 0, 0]))
        output = torch.empty(batch, views, pixels, channels, dtype=hidden.dtype, device=hidden.device)
        chunk = max(1, CHUNK_ELEMENTS // max(1, batch * views * geometry.num_tokens * channels))
        projections = self._input_space_projections()
        for start in range(0, pixels, chunk):
            stop = min(start + chunk, pixels)
            grid = geometry.grid[:, :, start:stop].expand(batch, -1, -1, -1, -1, -1)
            sampled = F.grid_sample(
                sources, grid.reshape(batch * views * slots, stop - start, samples, 2),
                mode="bilinear", padding_mode="zeros", align_corners=False,
            )  # (B * V * N, C, Pc, S)
            keys = sampled.view(batch, views, slots, channels, stop - start, samples).permute(0, 1, 4, 2, 5, 3)
            if encodings is not None:
                encoding = encodings[:, start:stop]
            else:
                encoding = self.encoding(geometry.encoding_input[:, start:stop])
            # One pass: the add reads the permuted samples and writes keys in (pixel, token) order.
            z = keys + encoding.view(views, stop - start, slots, samples, channels)
            valid = geometry.valid[:, start:stop].expand(batch, -1, -1, -1)
            output[:, :, start:stop] = self._attend(
                queries[:, :, start:stop].reshape(-1, channels), z.reshape(-1, geometry.num_tokens, channels),
                valid.reshape(-1, geometry.num_tokens), query_encoding, projections,
            ).view(batch, views, stop - start, channels)
        # Same memory layout as the input: downstream kernels then run exactly as without CAA.
        result = output.transpose(2, 3).reshape(total, channels, height, width)
        return torch.empty_like(hidden).copy_(result)

    def _input_space_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key and value matrices with the LayerNorm gain folded in, per head, and the value bias.

        ``W diag(gamma)`` maps normalised keys straight to projected ones; ``W_v beta`` is what
        the LayerNorm's shift adds to every value. Computed once per block call, not per chunk.
        """
        gamma, beta = self.norm1.weight, self.norm1.bias
        w_k = (self.to_k.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        w_v = (self.to_v.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        return w_k, w_v, self.to_v(beta)

    def _attend(self, x: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, query_encoding: torch.Tensor,
                projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        """Queries ``x`` (Q, C) attend to keys ``z`` (Q, T, C) (samples plus encodings)."""
        if not self.mask_invalid:
            z = z * valid[..., None]
        zhat = F.layer_norm(z, (self.dim,), eps=LAYER_NORM_EPS)

        # Queries: the block's own feature with the encoding of "no displacement".
        q = self.to_q(self.norm1(x + query_encoding)).view(-1, self.heads, HEAD_DIM)
        w_k, w_v, value_bias = projections
        q_in = torch.einsum("nhd,hdc->nhc", q, w_k) / math.sqrt(HEAD_DIM)

        # One query per sequence and a handful of keys shared by all heads: two batched matrix
        # products beat the fused attention kernels here (which also cap head sizes below 1280).
        logits = torch.bmm(q_in, zhat.transpose(1, 2))  # (Q, heads, T)
        if self.mask_invalid:
            # Rows without any valid key keep all (finite softmax); their update is dropped below.
            usable = valid | ~valid.any(dim=1, keepdim=True)
            logits = logits.masked_fill(~usable[:, None, :], float("-inf"))
        mixed = torch.bmm(logits.softmax(dim=-1), zhat)  # (Q, heads, C)
        attended = torch.einsum("nhc,hdc->nhd", mixed, w_v).reshape(-1, self.dim) + value_bias
        update = self.to_out(attended)
        if self.mask_invalid:
            # A pixel with no valid correspondence has nothing to attend to: no attention update.
            update = torch.where(valid.any(dim=1, keepdim=True), update, torch.zeros_like(update))
        x = x + update
        return x + self.ff(self.norm2(x))


class ZeroResNet(nn.Module):
    """GN -> ReLU -> conv3x3 -> GN -> ReLU -> conv3x3 (zero-initialised) plus identity.

    Follows each CAA block of the depth task; starts as the identity.
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

    def __init__(self, dim: int, encoding_inputs: int, with_resnet: bool, mask_invalid: bool = True):
        super().__init__()
        self.attention = CorrespondenceAttention(dim, encoding_inputs, mask_invalid)
        self.resnet = ZeroResNet(dim) if with_resnet else None

    def forward(self, hidden: torch.Tensor, geometry: LevelGeometry) -> torch.Tensor:
        hidden = self.attention(hidden, geometry)
        return self.resnet(hidden) if self.resnet is not None else hidden
