"""The positional encodings of the released MVDiffusion code, quirks included.

The released CAA weights were trained against these exact encodings, so running them needs the
same numbers, not the clean :class:`~backend.models.caa.SinusoidalEncoding`. Both released blocks
use one encoder (mvdiffusion.md §4, §5) that

* reads its input as consecutive *pairs* of scalars in memory order, whatever the input's shape;
* multiplies each scalar of a pair by ``count`` frequencies ``base ** k`` (k = 0 .. count - 1),
  with ``base = 2`` for up to 80 frequencies and ``5000 ** (1 / (count / 2.5))`` beyond;
* writes, per pair ``(a, b)``: ``[sin(a f), sin(b f), cos(a f), cos(b f)]`` (4 x count values).

Panoramas encode a 2-D displacement with ``count = dim // 4``, so a pair is one token's (dx, dy)
and the output is one ``dim`` vector per token. The depth blocks encode one scalar per token with
``count = dim // 2``: a pair then spans two tokens, and its 2 x dim values are split into two rows,
the sines of both scalars for the first token and the cosines of both for the second.

Both modules keep their frequencies in float32 (up to ~1.7e9 radians per unit, as released) through
any dtype cast of the model, since float16 cannot hold them; outputs take the input's dtype (the
geometry's float32, whatever the model's working dtype). The released code ran in float32, where
the results match it. At such frequencies the encodings are not smooth in their inputs: the
panorama encoding at dim 320 multiplies displacements by up to 2 ** 79, so a one-ulp change of a
camera rotation moves the released block's own output by 0.1 to 0.3 (relative) at SD 2 widths.
Agreement with the released code is therefore to its float32 noise floor, and only when the
displacements are computed in float32 the way it computes them
(:mod:`~backend.models.caa_geometry`).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .caa import Float32Buffers

RELEASED_BASE_SWITCH = 80
"""Up to this many frequencies the released encoder uses base 2, beyond it 5000 ** (1 / (count / 2.5))."""


def released_frequencies(count: int) -> torch.Tensor:
    """The released encoder's ``count`` float32 frequencies, computed as it computes them.

    The base is rounded to float32 and raised to exact integer exponents in float32, which is what
    the released module stored as its ``pe.freq_bands`` buffer.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    base = 2.0 if count <= RELEASED_BASE_SWITCH else 5000.0 ** (1.0 / (count / 2.5))
    return torch.pow(base, torch.arange(count, dtype=torch.float32))


class _ReleasedEncoding(Float32Buffers):
    """Shared state: ``dim``, the frequencies (the released formula's, or a checkpoint's own) and a cache key."""

    family = "released"

    def __init__(self, dim: int, count: int, frequencies: torch.Tensor | None):
        super().__init__()
        if frequencies is None:
            bands = released_frequencies(count)
        else:
            bands = frequencies.detach().to("cpu", torch.float32).reshape(-1).clone()
            if bands.numel() != count:
                raise ValueError(f"expected {count} frequencies for dim {dim}, got {bands.numel()}")
        self.dim, self.count = dim, count
        # The key names these exact frequencies: geometry caches encodings by key, and a checkpoint's
        # bands may differ from the formula's in the last bit.
        digest = hashlib.sha1(bands.numpy().tobytes()).hexdigest()[:16]
        self.key = (self.family, dim, digest)
        self.register_buffer("freq_bands", bands, persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, frequencies={self.count}"


class ReleasedPanoramaEncoding(_ReleasedEncoding):
    """Released panorama encoding of displacements (..., 2) -> (..., dim).

    Layout per token: ``[sin(dx f), sin(dy f), cos(dx f), cos(dy f)]`` over ``dim // 4``
    frequencies. Each token's own (dx, dy) forms the pair, so the result does not depend on how
    tokens are laid out or chunked, and the query encoding (of (0, 0)) is ``[0 ... 0, 1 ... 1]``.
    """

    family = "released-panorama"

    def __init__(self, dim: int, frequencies: torch.Tensor | None = None):
        if dim % 4:
            raise ValueError(f"dim {dim} must be a multiple of 4 for the released panorama encoding")
        super().__init__(dim, dim // 4, frequencies)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[-1] != 2:
            raise ValueError(f"the panorama encoding takes (..., 2) displacements, got {tuple(values.shape)}")
        angles = values[..., :, None] * self.freq_bands  # (..., 2, count)
        return torch.cat([angles.sin(), angles.cos()], dim=-2).flatten(-2).to(values.dtype)


class ReleasedDepthEncoding(_ReleasedEncoding):
    """Released depth encoding of one scalar per token (..., 1) -> (..., dim), pairing neighbours.

    The released block encodes, for one view, its (pixels, tokens) scalars in pixel-major order as
    one sequence and pairs element 2k with 2k + 1: element 2k gets ``[sin(s_2k f), sin(s_2k+1 f)]``
    and element 2k + 1 gets ``[cos(s_2k f), cos(s_2k+1 f)]`` (``dim // 2`` frequencies each).

    Here the last two axes before the channel, ``(..., P, T, 1)``, form one such sequence and any
    leading axes (views) are separate sequences, since the released code encodes each view apart.
    ``pairs_scalars`` tells :meth:`~backend.models.caa_tokens.KeyTokens.encode` so: it encodes a
    range of queries view by view, each piece from the start of the pair its first scalar is in,
    so chunks of any size pair exactly as the whole view does.

    Queries: the released code encodes a view's P query zeros the same way, so even pixels get an
    all-zero vector and odd pixels an all-one vector (``encoding(zeros(P, 1, 1))`` returns exactly
    that). The alternation has no effect: the query encoding is added before a LayerNorm, and a
    constant added to every channel is removed with the mean. One all-zero query vector for every
    pixel therefore gives the released queries (to float rounding). A sequence of odd length,
    which the released code cannot encode, is completed with a zero, so a lone query zero gets
    that all-zero vector.
    """

    family = "released-depth"
    pairs_scalars = True

    def __init__(self, dim: int, frequencies: torch.Tensor | None = None):
        if dim % 2:
            raise ValueError(f"dim {dim} must be even for the released depth encoding")
        super().__init__(dim, dim // 2, frequencies)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[-1] != 1:
            raise ValueError(f"the depth encoding takes (..., 1) scalars, got {tuple(values.shape)}")
        shape = values.shape[:-1]
        lead = shape[:-2] if len(shape) > 2 else ()
        scalars = values.reshape(*lead, -1)
        length = scalars.shape[-1]
        if length % 2:
            scalars = F.pad(scalars, (0, 1))
        angles = scalars.unflatten(-1, (-1, 2))[..., None] * self.freq_bands  # (..., pairs, 2, count)
        # Per pair [sin a, sin b, cos a, cos b]: the first row (sines) for element 2k, the second for 2k + 1.
        rows = torch.cat([angles.sin(), angles.cos()], dim=-2).reshape(*lead, -1, self.dim)
        return rows[..., :length, :].reshape(*shape, self.dim).to(values.dtype)
