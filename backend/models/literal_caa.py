"""The CAA block computed token by token, as the released MVDiffusion code computes it.

:class:`~backend.models.caa.CorrespondenceAttention` computes the same numbers in a fast form; this
is the plain statement it is measured against (``bench caa``, ``bench precision``, the tests).
Written from the released design's description (mvdiffusion.md §4-§5), not from its files:

* per query view, in a loop: each neighbour view's features are read at the view's sample
  positions with ``grid_sample``, the positional encoding of every token is computed and added,
  and invalid tokens become zero vectors (released behaviour) or are kept for masking;
* a transformer block per query pixel: one LayerNorm for the query (plus its encoding of zero)
  and for the tokens, full key and value projections of every token, ``dim // 32`` heads of 32
  channels, softmax attention, output projection, residual, then the GEGLU feed-forward;
* the depth design's ResNet once over all views, after the loop.

The released panorama blocks process the samples of a batch together and the depth blocks one
sample at a time; both are followed here. ``fused`` swaps the attention's three einsum-softmax
steps for ``scaled_dot_product_attention`` (what a plain attention layer runs today), which is
the floor ``bench precision`` compares half precision against. Geometry (sample positions,
validity, encoded scalars) is taken as computed once per job, where the released code
recomputes it at every call, so the timings favour this form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .caa import CAABlock, CorrespondenceAttention
from .caa_tokens import LevelGeometry, ViewGroups


def view_tokens(
    attention: CorrespondenceAttention, features: torch.Tensor, part: LevelGeometry, row: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query view's key tokens (B, P, T, C) with encodings added, and their validity (P, T).

    ``features`` (B, V, C, h, w) are the sample's views; ``row`` is the view's row in ``part``.
    Released behaviour (``mask_invalid`` off): invalid tokens are zero vectors.
    """
    batch, _, channels, height, width = features.shape
    slots = []
    for n in range(part.source_view.shape[1]):
        grid = part.grid[row, n][None].expand(batch, -1, -1, -1).to(features.dtype)
        source = features[:, int(part.source_view[row, n])]
        slots.append(F.grid_sample(source, grid, align_corners=False, padding_mode="zeros"))  # (B, C, P, S)
    keys = torch.cat(slots, dim=-1).permute(0, 2, 3, 1)  # (B, P, T, C)
    encoding = attention.encoding(part.encoding_input[row]).to(features.dtype)
    keys = keys + encoding
    valid = part.valid[row]
    if not attention.mask_invalid:
        keys = keys * valid[..., None].to(keys.dtype)
    return keys, valid


def literal_transformer(
    attention: CorrespondenceAttention,
    x: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    query_encoding: torch.Tensor,
    fused: bool = False,
    update_only: bool = False,
) -> torch.Tensor:
    """The released transformer step for queries ``x`` (N, C) over their tokens ``keys`` (N, T, C).

    With ``mask_invalid`` invalid tokens are left out of the softmax (a query with none keeps
    only the feed-forward), as the clean block does; otherwise they stay in it.
    ``update_only``: return what the attention adds to ``x``, before the residual and feed-forward.
    """
    count, tokens, channels = keys.shape
    heads = channels // 32
    query = attention.to_q(attention.norm1(x + query_encoding))
    context = attention.norm1(keys)
    k, v = attention.to_k(context), attention.to_v(context)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(count, -1, heads, 32).transpose(1, 2)  # (N, heads, L, 32)

    mask = None
    if attention.mask_invalid:
        usable = valid | ~valid.any(dim=-1, keepdim=True)
        mask = torch.zeros(count, 1, 1, tokens, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill_(~usable[:, None, None], float("-inf"))
    if fused:
        attended = F.scaled_dot_product_attention(split(query), split(k), split(v), attn_mask=mask)
    else:
        logits = torch.einsum("nhid,nhjd->nhij", split(query), split(k)) / math.sqrt(32)
        if mask is not None:
            logits = logits + mask
        attended = torch.einsum("nhij,nhjd->nhid", logits.softmax(dim=-1), split(v))
    update = attention.to_out(attended.transpose(1, 2).reshape(count, channels))
    if attention.mask_invalid:
        update = update * valid.any(dim=-1, keepdim=True).to(update.dtype)
    if update_only:
        return update
    x = x + update
    return x + attention.ff(attention.norm2(x))


def literal_attention(
    attention: CorrespondenceAttention,
    hidden: torch.Tensor,
    geometry: LevelGeometry | ViewGroups,
    per_sample: bool = False,
    fused: bool = False,
    update_only: bool = False,
) -> torch.Tensor:
    """The whole attention step for ``hidden`` (B * V, C, h, w), view by view (and sample by sample).

    ``update_only``: what the attention adds to each pixel, before the residual and feed-forward.
    """
    views = geometry.num_views
    total, channels, height, width = hidden.shape
    features = hidden.view(-1, views, channels, height, width)
    out = torch.empty_like(features)
    samples = [slice(b, b + 1) for b in range(features.shape[0])] if per_sample else [slice(None)]
    for owners, part in geometry.groups():
        query_views = range(views) if owners is None else owners.tolist()
        zeros = part.encoding_input.new_zeros(height * width, 1, part.encoding_input.shape[-1])
        query_encoding = attention.encoding(zeros)[:, 0].to(hidden.dtype)  # (P, C), released per-pixel layout
        for row, view in enumerate(query_views):
            for sample in samples:
                batch = features[sample]
                keys, valid = view_tokens(attention, batch, part, row)
                b = keys.shape[0]
                x = batch[:, view].reshape(b, channels, -1).transpose(1, 2).reshape(-1, channels)
                y = literal_transformer(
                    attention, x, keys.reshape(-1, *keys.shape[2:]), valid.repeat(b, 1),
                    query_encoding.repeat(b, 1), fused, update_only,
                )
                out[sample, view] = y.view(b, -1, channels).transpose(1, 2).reshape(b, channels, height, width)
    return out.view(total, channels, height, width)


def literal_block(block: CAABlock, hidden: torch.Tensor, geometry: LevelGeometry | ViewGroups, fused: bool = False):
    """A whole CAA block the literal way: the depth design (with a ResNet) runs sample by sample, as released."""
    per_sample = block.resnet is not None
    out = literal_attention(block.attention, hidden, geometry, per_sample=per_sample, fused=fused)
    return block.resnet(out) if block.resnet is not None else out
