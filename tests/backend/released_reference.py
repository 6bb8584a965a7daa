"""Literal statements of the released MVDiffusion CAA computations (mvdiffusion.md §4-§5), for tests.

Written from the reference text, independent of the fast implementation in backend/models/caa.py.
"""

import math

import torch


def released_pos_embedding(values: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """PosEmbedding, literally: reshape into pairs, [sin a, sin b, cos a, cos b], reshape back."""
    shape = values.shape[:-1]
    angles = values.reshape(-1, 2, 1) * frequencies.reshape(1, 1, -1).to(values.dtype)
    return torch.cat([angles.sin(), angles.cos()], dim=1).reshape(*shape, -1)


def released_attention(block, x: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                       key_encoding: torch.Tensor, query_encoding: torch.Tensor) -> torch.Tensor:
    """One view of the released block: x (P, 1, C) attends to (keys + encoding) * mask, (P, T, C).

    The same LayerNorm for queries and keys, full K/V projections, zeroed but unmasked invalid
    keys, then the feed-forward.
    """
    pixels, _, dim = x.shape
    heads = dim // 32
    context = block.norm1((keys + key_encoding) * mask[..., None])
    query = block.to_q(block.norm1(x + query_encoding))

    def split(t):
        return t.view(pixels, -1, heads, 32).transpose(1, 2)

    weights = (split(query) @ split(block.to_k(context)).transpose(-1, -2) / math.sqrt(32)).softmax(-1)
    x = x + block.to_out((weights @ split(block.to_v(context))).transpose(1, 2).reshape(pixels, 1, dim))
    return x + block.ff(block.norm2(x))
