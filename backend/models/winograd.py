"""3 x 3 convolutions in Winograd form for CPU inference in float32 (the depth design's ResNets).

oneDNN runs a 3 x 3 convolution on a CPU as 9 multiplications per output pixel and channel pair.
Winograd's minimal filtering F(m x m, 3 x 3) gets an m x m tile of outputs from an (m + 2)^2 tile
of inputs with (m + 2)^2 multiplications instead of 9 m^2: 2.25 x fewer for m = 2, 4 x fewer
for m = 4. Inputs and weights are moved into the transform domain (``B^T d B``, ``G g G^T``),
multiplied there as one batched matrix product per tile position, and the products moved back
(``A^T M A``). The transforms are small matrix products over whole chunks of tiles; the weights'
transform is computed once and kept until the weights change.

Rounding: relative error against a float64 convolution is about 6e-7 for m = 2 and 4e-6 for
m = 4, against 1e-6 for oneDNN's direct form (SD 2 widths, random weights). Zero weights give
exactly zero, so a zero-initialised layer stays the identity bitwise.

Where it runs: on a CPU, in float32, without autograd, and for layers at least
:data:`MIN_CHANNELS` wide (narrower ones spend their time in the transforms). GPUs keep cuDNN,
which chooses Winograd forms by itself, and half precision keeps the direct form (the transforms
multiply inputs by up to 25 and lose bits a half type does not have).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["MIN_CHANNELS", "WinogradConv3x3", "winograd_conv3x3", "winograd_tile", "winograd_weights"]

# F(m x m, 3 x 3) for m = 2 and m = 4 (interpolation points 0, +-1, +-2 and infinity): the input
# transform B^T, the weight transform G and the output transform A^T.
_TRANSFORMS: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

MIN_CHANNELS = 256
"""Narrowest layer (input and output channels) that runs in Winograd form."""

CACHE_BYTES = 6 * 2**20
"""Transformed input tiles per chunk that keep a chunk's transforms and product in the CPU's caches
(measured: at SD 2's 320-channel level 38 ms per convolution with 6.6 MB chunks, 62 ms with 8.8 MB)."""

OUT_OF_CACHE_PASSES = 8
"""Bytes moved through memory per byte of transformed tiles when a chunk does not fit the caches."""


def winograd_tile(height: int, width: int) -> int:
    """Output tile side m: 4 where the map tiles exactly by 4, else 2 (at most one padded row and column).

    F(4 x 4) on a map that does not tile by 4 wastes up to a third of its products and needs a
    weight transform 2.25 x the size of F(2 x 2)'s, which at 1280 channels is 236 MB per layer.
    """
    return 4 if height % 4 == 0 and width % 4 == 0 else 2


@functools.cache
def _matrices(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B^T, G and A^T as tensors, made once per tile size, dtype and device (every call needs them)."""
    return tuple(torch.tensor(t, dtype=torch.float64).to(device, dtype) for t in _TRANSFORMS[m])


@functools.cache
def _transforms_2d(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output transforms of whole tiles, ``B^T x B^T`` and ``A^T x A^T`` (Kronecker
    products): one matrix product with 36 (or 16) terms a row moves a tile, where the row-then-column
    form makes two passes with 6 terms, which a CPU's sgemm runs at a fraction of its rate."""
    b_t, _, a_t = _matrices(m, torch.float64, device)
    return torch.kron(b_t, b_t).to(dtype).contiguous(), torch.kron(a_t, a_t).to(dtype).contiguous()


def winograd_weights(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Weights (K, C, 3, 3) in the transform domain: (a * a, C, K), one matrix per tile position.

    Computed in float64, so the transform adds no rounding of its own.
    """
    _, g, _ = _matrices(m, torch.float64, weight.device)
    a = g.shape[0]
    out_channels, in_channels = weight.shape[:2]
    transformed = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
    return transformed.reshape(a * a, in_channels, out_channels).to(weight.dtype).contiguous()


def _samples_per_chunk(samples: int, tile_bytes: int, weight_bytes: int) -> int:
    """Samples per chunk: each chunk reads the transformed weights once, and a chunk whose tiles
    leave the caches moves them through memory several times; take the cheaper count."""
    def cost(count: int) -> float:
        spill = samples * tile_bytes * OUT_OF_CACHE_PASSES if count * tile_bytes > CACHE_BYTES else 0
        return math.ceil(samples / count) * weight_bytes + spill

    return min(range(1, samples + 1), key=lambda count: (cost(count), -count))


def winograd_conv3x3(
    x: torch.Tensor, transformed: torch.Tensor, m: int, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv2d(x, weight, padding=1)`` (plus ``residual``, (N, K, H, W)) for ``x`` (N, C, H, W)
    from the transformed weights.

    Returns (N, K, H, W) in channels-last memory, the layout the products leave behind. The
    residual is added as the tiles are written out, which saves a pass over the output.
    """
    samples, channels, height, width = x.shape
    b_both, a_both = _transforms_2d(m, x.dtype, x.device)
    a = m + 2
    out_channels = transformed.shape[2]
    rows, cols = -(-height // m), -(-width // m)
    tiles_per_sample = rows * cols
    chunk = _samples_per_chunk(
        samples, a * a * tiles_per_sample * channels * x.element_size(), transformed.numel() * x.element_size()
    )
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels-last input
    padded_height, padded_width = rows * m + 2, cols * m + 2
    exact = (rows * m, cols * m) == (height, width)
    out = torch.empty(samples, rows * m, cols * m, out_channels, dtype=x.dtype, device=x.device)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        padded = x.new_empty(n, padded_height, padded_width, channels)
        for border in (padded[:, :1], padded[:, height + 1:], padded[:, :, :1], padded[:, :, width + 1:]):
            border.zero_()
        padded[:, 1:height + 1, 1:width + 1] = pixels[start:start + n]
        s_n, s_h, s_w, s_c = padded.stride()
        # Tile positions first, so both transforms are plain products over whole rows of memory.
        tiles = padded.as_strided((a, a, n, rows, cols, channels), (s_h, s_w, s_n, m * s_h, m * s_w, s_c))
        v = torch.mm(b_both, tiles.contiguous().view(a * a, -1))  # (a * b, ...)
        product = torch.bmm(v.view(a * a, n * tiles_per_sample, channels), transformed)
        y = torch.mm(a_both, product.view(a * a, -1))
        y = y.view(m, m, n, rows, cols, out_channels).permute(2, 3, 0, 4, 1, 5)
        tiles_out = out[start:start + n].view(n, rows, m, cols, m, out_channels)
        if residual is not None and exact:
            torch.add(residual.permute(0, 2, 3, 1)[start:start + n].view(tiles_out.shape), y, out=tiles_out)
        else:
            tiles_out.copy_(y)
    if not exact:
        out = out[:, :height, :width]
        if residual is not None:
            out = out + residual.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)


class WinogradConv3x3(nn.Conv2d):
    """A 3 x 3, stride 1, padding 1 convolution without bias that runs in Winograd form where that is faster.

    Same parameters and state-dict keys as ``nn.Conv2d(..., 3, padding=1, bias=False)``. The
    transformed weights are kept between calls (a layer of C channels keeps ``(m + 2)^2 C^2``
    values: 105 MB at 1280 channels with m = 2) and recomputed when the weights change (load,
    in-place update, dtype or device).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        self._transformed: tuple[tuple, torch.Tensor] | None = None

    def uses_winograd(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and min(self.in_channels, self.out_channels) >= MIN_CHANNELS
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x``, plus ``residual`` (same shape as the output) if given."""
        if not self.uses_winograd(x):
            out = super().forward(x)
            return out if residual is None else residual + out
        m = winograd_tile(x.shape[-2], x.shape[-1])
        return winograd_conv3x3(x, self._weights_for(m), m, residual)

    def _weights_for(self, m: int) -> torch.Tensor:
        weight = self.weight
        key = (m, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._transformed is None or self._transformed[0] != key:
            with torch.no_grad():
                self._transformed = (key, winograd_weights(weight.detach(), m))
        return self._transformed[1]

    def _apply(self, fn, recurse: bool = True):
        self._transformed = None
        return super()._apply(fn, recurse)
