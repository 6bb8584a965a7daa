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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 32
LAYER_NORM_EPS = 1e-5
CHUNK_ELEMENTS = 16 * 2**20  # query tokens x key tokens x channels gathered at once (64 MB fp32)


@dataclass
class LevelGeometry:
    """Where every query pixel of one UNet level finds its key tokens; computed once per job.

    Shapes use V views, P = h * w query pixels, T key tokens per pixel and 4 bilinear taps:
    ``tap_index`` (V, P, T, 4) long: flat pixel index ``view * P + pixel`` of each tap in the
    level's feature maps; ``tap_weight`` (V, P, T, 4) float: bilinear weights, 0 for taps outside
    the source image (zero padding); ``valid`` (V, P, T) bool; ``encoding_input`` (V, P, T, E)
    float: what the positional encoding encodes (E = 2: displacement in query pixels; E = 1:
    relative depth error).
    """

    height: int
    width: int
    tap_index: torch.Tensor
    tap_weight: torch.Tensor
    valid: torch.Tensor
    encoding_input: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.tap_index.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tap_index.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LevelGeometry:
        return LevelGeometry(
            self.height,
            self.width,
            self.tap_index.to(device),
            self.tap_weight.to(device, dtype),
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
        pixels = height * width
        tokens = hidden.permute(0, 2, 3, 1).reshape(total * pixels, channels)
        output = torch.empty_like(tokens)
        # Query rows are (sample, view, pixel); each chunk gathers its keys from the whole batch.
        chunk = max(1, CHUNK_ELEMENTS // max(1, geometry.num_tokens * channels))
        per_sample = views * pixels
        query_encoding = self.encoding(torch.zeros_like(geometry.encoding_input[0, 0, 0]))
        for start in range(0, total * pixels, chunk):
            stop = min(start + chunk, total * pixels)
            output[start:stop] = self._attend(tokens, start, stop, per_sample, geometry, query_encoding)
        # Same memory layout as the input: downstream kernels then run exactly as without CAA.
        return torch.empty_like(hidden).copy_(output.view(total, height, width, channels).permute(0, 3, 1, 2))

    def _attend(
        self, tokens: torch.Tensor, start: int, stop: int, per_sample: int, geometry: LevelGeometry,
        query_encoding: torch.Tensor,
    ) -> torch.Tensor:
        """Updated rows ``start:stop`` of ``tokens`` (rows are sample, view, pixel)."""
        rows = torch.arange(start, stop, device=tokens.device)
        sample, local = rows // per_sample, rows % per_sample
        # Geometry rows are (view, pixel): the same flat index as ``local``.
        flat = geometry.tap_index.flatten(0, 1)
        x = tokens[start:stop]

        # Keys: bilinear samples of the neighbour views (zero outside), plus their encoding.
        index = flat[local] + (sample * per_sample)[:, None, None]
        weight = geometry.tap_weight.flatten(0, 1)[local]
        shape = (stop - start, geometry.num_tokens, self.dim)
        z = self.encoding(geometry.encoding_input.flatten(0, 1)[local])
        for tap in range(4):
            taps = tokens.index_select(0, index[..., tap].reshape(-1)).view(shape)
            z.addcmul_(taps, weight[..., tap, None])
        valid = geometry.valid.flatten(0, 1)[local]
        if not self.mask_invalid:
            z = z * valid[..., None]
        zhat = F.layer_norm(z, (self.dim,), eps=LAYER_NORM_EPS)

        # Queries: the block's own feature with the encoding of "no displacement".
        q = self.to_q(self.norm1(x + query_encoding)).view(-1, self.heads, HEAD_DIM)
        gamma, beta = self.norm1.weight, self.norm1.bias
        w_k = (self.to_k.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        w_v = (self.to_v.weight * gamma).view(self.heads, HEAD_DIM, self.dim)
        q_in = torch.einsum("nhd,hdc->nhc", q, w_k) / math.sqrt(HEAD_DIM)

        # One query per sequence and a handful of keys shared by all heads: two batched matrix
        # products beat the fused attention kernels here (which also cap head sizes below 1280).
        logits = torch.bmm(q_in, zhat.transpose(1, 2))  # (N, heads, T)
        if self.mask_invalid:
            # Rows without any valid key keep all (finite softmax); their update is dropped below.
            usable = valid | ~valid.any(dim=1, keepdim=True)
            logits = logits.masked_fill(~usable[:, None, :], float("-inf"))
        mixed = torch.bmm(logits.softmax(dim=-1), zhat)  # (N, heads, C)
        attended = torch.einsum("nhc,hdc->nhd", mixed, w_v).reshape(-1, self.dim) + self.to_v(beta)
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
