"""Training-free multi-view self-attention: a pretrained UNet's own attention, widened across views.

Every self-attention layer (``attn1`` of diffusers' ``BasicTransformerBlock``) of any
``UNet2DConditionModel`` gets :class:`MultiViewSelfAttention` as its processor. A call without
multi-view geometry is the plain processor (``AttnProcessor2_0``), so the model is unchanged
until a job asks for more. With geometry, passed per call as ``cross_attention_kwargs=
{"multiview": ViewAttention}``, each view's queries attend, in one softmax and through the
layer's own pretrained ``to_q``/``to_k``/``to_v``/``to_out``, to

* ``"correspondence"``: their own view's tokens plus, per query, the tokens of its neighbour
  views at the query's correspondence (the cell it lands in) and the K x K cells around it, or
* ``"views"``: their own view's tokens plus every token of the nearest neighbour views
  (MVDream's 3D self-attention, without its training).

Neighbour tokens are the neighbours' own tokens, so their keys and values are rows of the keys
and values the layer projects anyway: nothing is projected twice, and a token costs one row read
(bilinear samples would cost four and blur what the neighbour has). The softmax over own and
neighbour tokens is one
softmax: the own-view attention runs as a fused kernel that also returns its log-sum-exp, the
per-query neighbour tokens are scored separately, and the two parts are merged by their
log-sum-exps. Geometry is built once per job (:mod:`~backend.models.view_attention_geometry`)
and never stored on the shared modules, so concurrent jobs with different geometry cannot mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

AttentionKind = Literal["correspondence", "views"]
ATTENTION_KINDS: tuple[str, ...] = ("correspondence", "views")
KWARG = "multiview"
"""The ``cross_attention_kwargs`` key that carries a :class:`ViewAttention`."""
QUERY_CHUNK = 1024
"""Queries per block when scoring neighbour tokens: bounds the sampled keys and values in memory."""


@dataclass
class NeighbourTokens:
    """Per query of one level, the rows of its neighbour tokens in a sample's (view * h * w + pixel) table.

    ``rows`` (V * P, T) long, ``valid`` (V * P, T) bool (an invalid token's row is any row). Tokens
    are kept valid-first and cut at the largest valid count of any query.
    """

    rows: torch.Tensor
    valid: torch.Tensor

    @property
    def count(self) -> int:
        return self.rows.shape[1]

    def to(self, device: torch.device | str) -> NeighbourTokens:
        return NeighbourTokens(self.rows.to(device), self.valid.to(device))


@dataclass
class ViewAttention:
    """One job's multi-view attention geometry, for V views per sample.

    ``tokens`` maps a level's token count (h * w) to its neighbour tokens (``"correspondence"``);
    ``neighbours`` lists each view's neighbour views, nearest first (``"views"``: each view reads
    all tokens of its first ``max_views``). A view with nothing to read attends to itself only,
    exactly as the plain layer does.
    """

    views: int
    kind: AttentionKind = "correspondence"
    tokens: dict[int, NeighbourTokens] = field(default_factory=dict)
    neighbours: list[list[int]] = field(default_factory=list)
    max_views: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if self.neighbours and len(self.neighbours) != self.views:
            raise ValueError(f"expected one neighbour list per view ({self.views}), got {len(self.neighbours)}")

    def kwargs(self) -> dict[str, ViewAttention]:
        """What a UNet call passes as ``cross_attention_kwargs``."""
        return {KWARG: self}


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, N, d) and the log-sum-exp of its logits (B, H, N), fused where torch can.

    The public ``scaled_dot_product_attention`` drops the log-sum-exp, which merging with the
    neighbour tokens needs; torch's CPU flash kernel returns it. Elsewhere the logits are formed
    in blocks of queries (same numbers, more memory traffic).
    """
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float64):
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is not None:
            out, lse = op(q, k, v, 0.0, False, scale=scale)[:2]
            return out, lse.to(torch.float32)
    outs, lses = [], []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        logits = torch.matmul(q[:, :, start:start + QUERY_CHUNK], k.transpose(-1, -2)).float() * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse[..., None]).to(v.dtype), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


class MultiViewSelfAttention:
    """The processor of every self-attention layer; the plain processor unless a call carries geometry."""

    def __init__(self) -> None:
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 multiview: ViewAttention | None = None):
        usable = (
            multiview is not None and encoder_hidden_states is None and attention_mask is None
            and hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
        )
        if not usable:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        total, count, _ = hidden_states.shape
        if total % multiview.views:
            raise ValueError(f"a batch of {total} is not whole samples of {multiview.views} views")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        scale = attn.scale

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(total, count, heads, head_dim).transpose(1, 2)

        if multiview.kind == "views":
            out = _attend_views(split(query), split(key), split(value), multiview, scale)
        else:
            out = _attend_correspondences(split(query), split(key), split(value), key, value,
                                          multiview.tokens.get(count), multiview.views, scale)
        out = out.transpose(1, 2).reshape(total, count, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _attend_correspondences(q, k, v, key_rows, value_rows, tokens: NeighbourTokens | None, views: int,
                            scale: float):
    """Own-view attention merged, in one softmax, with each query's neighbour tokens."""
    own, own_lse = attention_with_lse(q, k, v, scale)
    if tokens is None or tokens.count == 0 or not bool(tokens.valid.any()):
        return own
    total, heads, count, head_dim = q.shape
    batch = total // views
    inner = heads * head_dim
    queries = views * count
    keys = key_rows.reshape(batch, queries, inner)
    values = value_rows.reshape(batch, queries, inner)
    bias = torch.zeros(tokens.valid.shape, dtype=torch.float32, device=q.device).masked_fill_(~tokens.valid,
                                                                                                float("-inf"))
    has = tokens.valid.any(dim=-1)
    qs = q.transpose(1, 2).reshape(batch, queries, heads, head_dim)
    out = own.transpose(1, 2).reshape(batch, queries, heads, head_dim).clone()
    lse = own_lse.transpose(1, 2).reshape(batch, queries, heads)
    for sample in range(batch):
        for start in range(0, queries, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, queries)
            rows = tokens.rows[start:stop].reshape(-1)
            n, t = stop - start, tokens.count
            token_keys = keys[sample].index_select(0, rows).view(n, t, heads, head_dim)
            token_values = values[sample].index_select(0, rows).view(n, t, heads, head_dim)
            # A handful of tokens per query: products and sums over small axes beat batched matmuls.
            # The sums run in float32: in half precision a head's dot product of large features
            # overflows or loses the softmax, as the fused kernel of the own tokens does not.
            logits = (token_keys.float() * qs[sample, start:stop, None].float()).sum(dim=-1) * scale  # (n, t, heads)
            logits = logits + bias[start:stop, :, None]
            part = has[start:stop, None]
            # Queries without a valid token score their (masked) row as all -inf: keep the exponent finite.
            token_lse = torch.logsumexp(torch.where(part[..., None], logits, 0.0), dim=1)  # (n, heads)
            probs = torch.exp(logits - token_lse[:, None])
            token_out = (probs.to(token_values.dtype)[..., None] * token_values).sum(dim=1)  # (n, heads, d)
            token_lse = token_lse.masked_fill(~part, float("-inf"))
            own_part = lse[sample, start:stop]
            merged = torch.logaddexp(own_part, token_lse)
            w_own = torch.exp(own_part - merged)[..., None].to(out.dtype)
            w_tok = torch.exp(token_lse - merged)[..., None].to(out.dtype)
            out[sample, start:stop] = out[sample, start:stop] * w_own + token_out.nan_to_num(0.0) * w_tok
    return out.view(batch * views, count, heads, head_dim).transpose(1, 2)


def _attend_views(q, k, v, multiview: ViewAttention, scale: float):
    """Each view attends to its own tokens and all tokens of its nearest ``max_views`` neighbours."""
    total, heads, count, head_dim = q.shape
    views = multiview.views
    batch = total // views
    read = [[i, *row[: multiview.max_views]] for i, row in enumerate(multiview.neighbours or [[]] * views)]
    q5, k5, v5 = (x.view(batch, views, heads, count, head_dim) for x in (q, k, v))
    out = torch.empty_like(q5)
    for width in sorted({len(r) for r in read}):
        owners = [i for i, r in enumerate(read) if len(r) == width]
        index = torch.tensor([read[i] for i in owners], device=q.device)  # (G, width)

        def gather(x: torch.Tensor, index=index, width=width, owners=owners) -> torch.Tensor:
            picked = x[:, index]  # (batch, G, width, heads, count, d)
            return picked.permute(0, 1, 3, 2, 4, 5).reshape(batch * len(owners), heads, width * count, head_dim)

        group_q = q5[:, owners].reshape(batch * len(owners), heads, count, head_dim)
        result = F.scaled_dot_product_attention(group_q, gather(k5), gather(v5), scale=scale)
        out[:, owners] = result.view(batch, len(owners), heads, count, head_dim)
    return out.view(total, heads, count, head_dim)


class IgnoresViews(AttnProcessor2_0):
    """The plain processor for the other attention layers: takes the multi-view argument and drops it.

    ``cross_attention_kwargs`` reach every attention layer; without this, each cross-attention
    call would warn that it got an argument it does not know.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 multiview: ViewAttention | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def is_self_attention(name: str) -> bool:
    """Processor names of the self-attention layers: ``attn1`` of every transformer block."""
    return name.endswith("attn1.processor")


def install_view_attention(unet) -> None:
    """Give every self-attention layer of ``unet`` the multi-view processor (idempotent).

    Other layers get :class:`IgnoresViews`. Without a ``multiview`` argument every layer computes
    exactly what diffusers' default processor computes.
    """
    processors = unet.attn_processors
    wanted = {n: MultiViewSelfAttention if is_self_attention(n) else IgnoresViews for n in processors}
    if all(isinstance(p, wanted[n]) for n, p in processors.items()):
        return
    shared_self, shared_other = MultiViewSelfAttention(), IgnoresViews()
    unet.set_attn_processor({n: shared_self if is_self_attention(n) else shared_other for n in processors})

