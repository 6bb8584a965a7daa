"""Where CAA's key tokens come from: one level's geometry, worked out once per job.

A query pixel of view i attends to a handful of key tokens, bilinear samples of its neighbour
views' features at (and around) its correspondences, each with a positional encoding of the
displacement (panoramas) or the depth disagreement (scenes). This module holds that geometry and
the form the attention reads it in; :mod:`~backend.models.caa` holds the block that attends.

Precision. The geometry is kept in float32 (float64 for a float64 model) whatever the model's
working dtype: a bfloat16 level coordinate on a 64-wide map is off by up to half a cell, and a
bfloat16 displacement times the encoding's highest frequency is off by a tenth of a radian.
Only what the attention multiplies with features (bilinear weights and the finished
encodings) takes the working dtype, and the encodings are computed in float32 before the cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ENCODING_CACHE_ELEMENTS = 64 * 2**20
"""Key encodings kept per level between steps (tokens x channels; 256 MB in float32)."""


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype geometry is kept in for a model computing in ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class KeyTokens:
    """Per query pixel, its key tokens as bilinear taps into the level's features, for one working dtype.

    ``rows`` (V, P, T, 4) int32 index one sample's features laid out as (view * h * w + y * w + x,
    channel); ``weights`` (V, P, T, 4) are the bilinear weights (0 for a tap outside the map);
    ``valid`` (V, P, T); ``encoding_input`` (V, P, T, E) in the geometry's precision.
    ``zero_invalid``: invalid tokens are zero vectors, encoding included, rather than masked out.
    V counts the views this geometry answers for (all of a sample's views, or one group's).
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

    def encoded(self, encoding: nn.Module) -> torch.Tensor | None:
        """The key encodings (V * P, T, C) for ``encoding``, computed once and kept, if small enough.

        They depend only on the geometry, so every step and both blocks of a level share them.
        """
        key = (encoding.key, self.weights.dtype, self.weights.device)
        if key not in self._encodings:
            small = self.encoding_input[..., 0].numel() * encoding.dim <= ENCODING_CACHE_ELEMENTS
            self._encodings[key] = self.encode(encoding) if small else None
        return self._encodings[key]

    def encode(self, encoding: nn.Module, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Key encodings (Q, T, C) of the queries ``start:stop`` over (view, pixel), not cached.

        An encoding with ``pairs_scalars`` set (the released depth encoding) encodes each view's
        (pixels, tokens) scalars as one sequence in pairs, so a range is encoded view by view,
        each piece widened by a pixel where a pair crosses its start or its end.
        """
        views, pixels, tokens = self.valid.shape
        stop = views * pixels if stop is None else stop
        values = self.encoding_input.view(views * pixels, tokens, -1)
        if getattr(encoding, "pairs_scalars", False):
            pieces = []
            for view in range(start // pixels, (stop - 1) // pixels + 1):
                origin, end = view * pixels, (view + 1) * pixels
                first, last = max(start, origin), min(stop, end)
                begin = first - ((first - origin) * tokens) % 2
                until = min(end, last + ((last - origin) * tokens) % 2)
                pieces.append(encoding(values[begin:until])[first - begin:last - begin])
            encoded = torch.cat(pieces)
        else:
            encoded = encoding(values[start:stop])
        encoded = encoded.to(self.weights.dtype)
        if self.zero_invalid:
            encoded = encoded * self.valid.view(views * pixels, tokens, 1)[start:stop]
        return encoded


@dataclass
class TokenBucket:
    """Queries of one level that attend over the same number of key tokens, k, and those tokens.

    ``queries`` (N,) long: the queries' positions in one sample's (view, pixel) order; ``rows`` and
    ``weights`` (N, k, 4): their tokens' taps, and ``encoding_input`` (N, k, E) what their
    encodings encode, as in :class:`KeyTokens`. ``pieces``: the parts' tokens the queries come
    from, each with the queries' positions among that part's (view, pixel) queries (``None``: all
    of them, in order), which is where encodings that pair scalars come from.
    """

    queries: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    encoding_input: torch.Tensor
    pieces: tuple[tuple[KeyTokens, torch.Tensor | None], ...]
    _encodings: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.rows.shape[1]

    def encoded(self, encoding: nn.Module) -> torch.Tensor | None:
        """The bucket's key encodings (N, k, C), computed once and kept if small enough (else ``None``)."""
        if len(self.pieces) == 1 and self.pieces[0][1] is None:
            return self.pieces[0][0].encoded(encoding)
        key = (encoding.key, self.weights.dtype, self.weights.device)
        if key not in self._encodings:
            if getattr(encoding, "pairs_scalars", False):
                # Such an encoding pairs scalars along each part's whole sequence, so it is taken
                # from the parts' encodings and kept whatever its size.
                self._encodings[key] = torch.cat([
                    keys.encode(encoding)[positions, : self.tokens] for keys, positions in self.pieces
                ])
            elif self.rows[..., 0].numel() * encoding.dim <= ENCODING_CACHE_ELEMENTS:
                self._encodings[key] = self.encode(encoding, 0, len(self.queries))
            else:
                self._encodings[key] = None
        return self._encodings[key]

    def encode(self, encoding: nn.Module, start: int, stop: int) -> torch.Tensor:
        """Key encodings (n, k, C) of the bucket's queries ``start:stop``, not cached."""
        if len(self.pieces) == 1 and self.pieces[0][1] is None:
            return self.pieces[0][0].encode(encoding, start, stop)
        return encoding(self.encoding_input[start:stop]).to(self.weights.dtype)


def token_buckets(
    groups: tuple[tuple[torch.Tensor | None, LevelGeometry], ...], drop_invalid: bool, dtype: torch.dtype
) -> tuple[TokenBucket, ...]:
    """The level's queries in buckets by token count, ascending; queries without a token are in none.

    With ``drop_invalid`` a query attends over its valid tokens only, so queries are grouped by
    how many they have: every token a bucket reads is valid, none of the work goes to tokens the
    softmax would drop (on trajectories and panoramas about half of them), and a query without
    any gets no attention at all. Otherwise (invalid tokens as zero vectors, the released
    behaviour) each part's queries stay whole, in order, with all their tokens.
    """
    buckets: dict[int, list[tuple[KeyTokens, torch.Tensor | None, torch.Tensor]]] = {}
    for owners, part in groups:
        keys = part.key_tokens(drop_invalid, dtype)
        views, pixels, count = keys.valid.shape
        pixel = torch.arange(pixels, device=keys.valid.device)
        views_of_sample = owners.to(pixel.device) if owners is not None else torch.arange(views, device=pixel.device)
        queries = (views_of_sample[:, None] * pixels + pixel).reshape(-1)
        if not drop_invalid:
            buckets.setdefault(count, []).append((keys, None, queries))
            continue
        valid_counts = keys.valid.sum(dim=-1).reshape(-1)
        for tokens in valid_counts.unique().tolist():
            if tokens:
                positions = (valid_counts == tokens).nonzero()[:, 0]
                buckets.setdefault(tokens, []).append((keys, positions, queries[positions]))
    out = []
    for tokens, members in sorted(buckets.items()):
        if not drop_invalid:
            out.extend(
                TokenBucket(queries, *(t.flatten(0, 1) for t in (keys.rows, keys.weights, keys.encoding_input)),
                            ((keys, None),))
                for keys, _, queries in members
            )
            continue
        rows, weights, inputs = (
            torch.cat([getattr(keys, name).flatten(0, 1)[positions, :tokens] for keys, positions, _ in members])
            for name in ("rows", "weights", "encoding_input")
        )
        out.append(TokenBucket(
            torch.cat([queries for *_, queries in members]), rows, weights, inputs,
            tuple((keys, positions) for keys, positions, _ in members),
        ))
    return tuple(out)


@dataclass
class LevelGeometry:
    """Where every query pixel of one UNet level finds its key tokens; computed once per job.

    Shapes use V views, P = h * w query pixels, N neighbour slots per view, S samples per slot
    (K x K) and T = N * S key tokens per pixel (slot-major). ``source_view`` (V, N) long: the
    view of the sample each slot reads (any view for an unused slot); ``grid`` (V, N, P, S, 2)
    float: ``grid_sample`` coordinates (``align_corners=False``, zero padding) in that view's
    level features; ``valid`` (V, P, T) bool; ``encoding_input`` (V, P, T, E) float: what the
    positional encoding encodes (E = 2: displacement in query pixels; E = 1: depth error).

    The V views are every view of a sample, unless the geometry is one part of
    :class:`ViewGroups`, which says whose queries each part answers.
    """

    height: int
    width: int
    source_view: torch.Tensor
    grid: torch.Tensor
    valid: torch.Tensor
    encoding_input: torch.Tensor
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_views(self) -> int:
        return self.source_view.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.valid.shape[2]

    def groups(self) -> tuple[tuple[torch.Tensor | None, LevelGeometry], ...]:
        """(query views, geometry) pairs: one, answering for every view."""
        return ((None, self),)

    def buckets(self, drop_invalid: bool, dtype: torch.dtype) -> tuple[TokenBucket, ...]:
        """:func:`token_buckets` of this level, worked out once per job and dtype, and kept."""
        key = ("buckets", drop_invalid, self.grid.device, dtype)
        if key not in self._tokens:
            self._tokens[key] = token_buckets(self.groups(), drop_invalid, dtype)
        return self._tokens[key]

    def key_tokens(self, drop_invalid: bool, dtype: torch.dtype | None = None) -> KeyTokens:
        """The key tokens in the form the attention reads, worked out once per job and dtype, and kept.

        ``drop_invalid`` leaves out tokens without a valid correspondence (they are masked out of
        the softmax anyway): each pixel's valid tokens come first and the list is cut at the
        largest count any pixel has. A panorama view sees each pixel in one of its two ring
        neighbours, so this halves the token work. Without it (the released behaviour) invalid
        tokens stay, as zero vectors: their taps and encodings are zeroed.
        """
        dtype = self.grid.dtype if dtype is None else dtype
        key = (drop_invalid, self.grid.device, dtype)
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
            self._tokens[key] = KeyTokens(rows, weights.to(dtype), valid, encoding_input, not drop_invalid)
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

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LevelGeometry:
        """On ``device``, for a model computing in ``dtype`` (the geometry stays float32 or float64)."""
        precise = geometry_dtype(dtype)
        return LevelGeometry(
            self.height,
            self.width,
            self.source_view.to(device),
            self.grid.to(device, precise),
            self.valid.to(device),
            self.encoding_input.to(device, precise),
        )


@dataclass
class ViewGroups:
    """One level's geometry as several :class:`LevelGeometry`, each answering for some of the views.

    The released code gives every view exactly its own neighbours: a view with two attends over
    two keys, one with four over four, and its depth encoding pairs only its own scalars. A
    :class:`LevelGeometry` has one slot count for all views, and padded slots would join the
    softmax as zero keys. So views are grouped by slot count: ``parts[k]`` holds the tokens of
    the views ``owners[k]`` (ascending), one row per owner, its slots naming views of the whole
    sample. A CAA block runs everything per query once for all views and only the attention
    over key tokens per bucket of queries (:func:`token_buckets`), so grouping costs no repeated
    work.
    """

    views: int
    parts: tuple[LevelGeometry, ...]
    owners: tuple[torch.Tensor, ...]
    _buckets: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.parts or len(self.parts) != len(self.owners):
            raise ValueError("need owners for every part, and at least one part")
        first = self.parts[0]
        for part, owners in zip(self.parts, self.owners, strict=True):
            if (part.height, part.width) != (first.height, first.width) or part.num_views != len(owners):
                raise ValueError("every part must cover one level size and have one row per owner")
            if part.source_view.numel() and not bool(((part.source_view >= 0) & (part.source_view < self.views)).all()):
                raise ValueError(f"a part's slots must name views of the sample (0..{self.views - 1})")
        owned = torch.cat([o.reshape(-1).cpu() for o in self.owners]).sort().values
        if not torch.equal(owned, torch.arange(self.views)):
            raise ValueError("every view must be owned by exactly one part")

    @property
    def height(self) -> int:
        return self.parts[0].height

    @property
    def width(self) -> int:
        return self.parts[0].width

    @property
    def num_views(self) -> int:
        return self.views

    def groups(self) -> tuple[tuple[torch.Tensor | None, LevelGeometry], ...]:
        """(query views, geometry) pairs, one per part."""
        return tuple(zip(self.owners, self.parts, strict=True))

    def buckets(self, drop_invalid: bool, dtype: torch.dtype) -> tuple[TokenBucket, ...]:
        """:func:`token_buckets` over all parts, worked out once per job and dtype, and kept."""
        key = (drop_invalid, self.parts[0].grid.device, dtype)
        if key not in self._buckets:
            self._buckets[key] = token_buckets(self.groups(), drop_invalid, dtype)
        return self._buckets[key]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ViewGroups:
        return ViewGroups(
            self.views, tuple(p.to(device, dtype) for p in self.parts), tuple(o.to(device) for o in self.owners)
        )
