"""Which keys a query may read, and the relative-position terms added to its logits.

Positions. Queries are the *last* ``q_len`` positions of the key sequence (bottom-right
alignment): query i sits at absolute position ``k_len - q_len + i``; ``q_offset`` (a static KV
cache) places it at ``q_offset + i`` instead (:func:`query_positions`). Key j sits at j.

Which keys a query at position i may read (all conditions must hold):
- ``causal``: j <= i.
- ``key_padding_mask`` (batch, k_len) bool, True = a real token: key j is real, *or* j == i.
  The ``j == i`` exception keeps every row non-empty, so padded queries attend to themselves
  instead of producing NaN; real queries never see padded keys.
- ``window=w`` (local attention): the query reads the ``w`` most recent keys including itself,
  ``0 <= i - j < w``; without ``causal`` the band is symmetric, ``|i - j| < w``.
- ``sparsity`` (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"):
  ``Sparsity("strided", stride=l)``: ``|i - j| < l`` or ``(i - j) % l == 0``;
  ``Sparsity("fixed", stride=l, summary=c)``: same block ``i // l == j // l`` or j is one of the
  last c positions of its block, ``j % l >= l - c``;
  ``Sparsity("block", block_size=b, layout=L)``: a bool layout L (q_blocks, k_blocks) of blocks of
  b positions, ``L[i // b, j // b]``.
  The diagonal j == i is always allowed, so no row is empty.
- ``relative_bias`` adds a position-dependent term to the logits (see :class:`RelativeBias`).

The rule reads positions only, so a tile's mask is the sub-block of the whole mask: the dense
paths call :func:`dense_mask` on whole position vectors, the blockwise kernel calls
:func:`allowed_mask` on a tile's slices (proofs/attention.md, Claim 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...checks import check_choice, check_int

__all__ = [
    "Sparsity", "RelativeBias", "allowed_mask", "dense_mask", "query_positions", "t5_bucket", "table_lookup",
    "relative_logits", "check_relative_bias", "SPARSE_PATTERNS",
]

SPARSE_PATTERNS = ("strided", "fixed")  # the patterns a stride defines (a ModelConfig picks one)


@dataclass(frozen=True)
class Sparsity:
    """A fixed sparse pattern (Child et al. 2019): ``"strided"``, ``"fixed"`` or ``"block"``."""

    pattern: str
    stride: int = 0
    summary: int = 1
    block_size: int = 0
    layout: Optional[Tensor] = None  # (q_blocks, k_blocks) bool, for "block"

    def __post_init__(self):
        check_choice("sparsity pattern", self.pattern, SPARSE_PATTERNS + ("block",))
        if self.pattern in SPARSE_PATTERNS:
            check_int("sparsity stride", self.stride, min=1)
        if self.pattern == "fixed":
            check_int("sparsity summary", self.summary, min=1, max=self.stride)
        if self.pattern == "block":
            check_int("block sparsity block_size", self.block_size, min=1)
            if not isinstance(self.layout, Tensor) or self.layout.dtype != torch.bool or self.layout.dim() != 2:
                raise ValueError("block sparsity needs layout, a 2-D bool tensor (q_blocks, k_blocks)")


@dataclass(frozen=True)
class RelativeBias:
    """A relative-position term added to the attention logits, chosen by ``kind``:

    - ``"shaw"`` (Shaw et al. 2018): ``table`` (2K+1, head_dim) or (heads, 2K+1, head_dim) of learned
      key embeddings; logit_ij += q_i · table[clip(j - i, -K, K) + K], K = ``max_distance``; the
      whole logit (content + position) is then multiplied by the scale.
    - ``"t5"`` (Raffel et al. 2020): ``table`` (heads, num_buckets); logit_ij += table[h, bucket(j - i)]
      with T5's log-spaced buckets (``bidirectional`` splits them by sign), added after scaling.
    - ``"alibi"`` (Press et al. 2022): ``table`` (heads,) of slopes; logit_ij += -slope_h * |i - j|,
      added after scaling.
    """

    kind: str
    table: Tensor
    max_distance: int = 128
    num_buckets: int = 32
    bidirectional: bool = True

    def __post_init__(self):
        if self.kind not in ("shaw", "t5", "alibi"):
            raise ValueError(f"relative_bias kind must be 'shaw', 't5' or 'alibi', got {self.kind!r}")
        if not isinstance(self.table, Tensor):
            raise TypeError(f"relative_bias table must be a Tensor, got {type(self.table).__name__}")
        check_int("relative_bias max_distance", self.max_distance, min=1)
        if self.kind == "t5":  # T5's exact range (half the buckets, per sign if bidirectional) must hold a bucket
            check_int("relative_bias num_buckets", self.num_buckets, min=4 if self.bidirectional else 2)


def check_relative_bias(rel: Optional[RelativeBias], q: Tensor) -> None:
    """The table's shape must fit q (batch, heads, q_len, head_dim), and it must be floating."""
    if rel is None:
        return
    H, d = q.shape[1], q.shape[-1]
    t = rel.table
    if rel.kind == "shaw":
        n = 2 * rel.max_distance + 1
        if tuple(t.shape) not in ((n, d), (H, n, d)):
            raise ValueError(f"shaw table must be (2K+1, head_dim) = {(n, d)} or (heads, 2K+1, head_dim) = {(H, n, d)}, got {tuple(t.shape)}")
    elif rel.kind == "t5":
        if tuple(t.shape) != (H, rel.num_buckets):
            raise ValueError(f"t5 table must be (heads, num_buckets) = {(H, rel.num_buckets)}, got {tuple(t.shape)}")
    elif tuple(t.shape) != (H,):
        raise ValueError(f"alibi table must hold one slope per head, shape {(H,)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"relative_bias table must be floating point, got {t.dtype}")


def query_positions(Tq: int, Tk: int, q_offset, device) -> Tensor:
    """Absolute positions (Tq,) of the queries: the last Tq key positions, or from ``q_offset``."""
    if q_offset is None:
        return torch.arange(Tk - Tq, Tk, device=device)
    return torch.arange(Tq, device=device) + q_offset


def allowed_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
) -> Tensor:
    """(len(q_pos), len(k_pos)) bool: which keys each query may read, from positions alone.

    Used whole by the dense paths and tile by tile by the blockwise kernel. Key padding is separate.
    """
    i = q_pos[:, None]
    j = k_pos[None, :]
    ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        d = i - j
        ok = ok & ((d < window) & (d >= 0) if causal else d.abs() < window)
    if sparsity is not None:
        if sparsity.pattern == "strided":
            d = i - j
            sp = (d.abs() < sparsity.stride) | (torch.remainder(d, sparsity.stride) == 0)
        elif sparsity.pattern == "fixed":
            l, c = sparsity.stride, sparsity.summary
            sp = (torch.div(i, l, rounding_mode="floor") == torch.div(j, l, rounding_mode="floor")) | (
                torch.remainder(j, l) >= l - c
            )
        else:
            b = sparsity.block_size
            layout = sparsity.layout.to(q_pos.device)
            qb = torch.div(i, b, rounding_mode="floor").clamp(max=layout.shape[0] - 1)
            kb = torch.div(j, b, rounding_mode="floor").clamp(max=layout.shape[1] - 1)
            sp = layout[qb, kb]
        ok = ok & (sp | (i == j))
    return ok


def dense_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    key_padding_mask: Optional[Tensor],
    *,
    causal: bool,
    window: Optional[int],
    sparsity: Optional[Sparsity],
) -> Tensor:
    """The whole mask of a dense path: (Tq, Tk) from positions, or (batch, 1, Tq, Tk) with key
    padding, where a padded key stays readable by the query at its own position."""
    ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)
    if key_padding_mask is not None:
        ok = ok & (key_padding_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :]))
    return ok


def t5_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's relative-position bucket of ``relative = j - i`` (Raffel et al. 2020, as in mesh-tensorflow)."""
    buckets = torch.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n = n // 2
        buckets = buckets + (relative > 0).to(relative.dtype) * n
        rel = relative.abs()
    else:
        rel = (-relative).clamp(min=0)
    max_exact = n // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).to(relative.dtype)
    large = large.clamp(max=n - 1)
    return buckets + torch.where(is_small, rel, large)


def table_lookup(table: Tensor, *index: Tensor) -> Tensor:
    """``table[index]`` for integer ``index`` tensors (one per leading dim of ``table``, each in
    range, broadcasting together): the same values as indexing, but its gradient adds repeated
    entries in index order (``index_select``'s backward, ``index_add``), so it is bitwise
    reproducible; indexing's backward (``index_put_`` with accumulate) adds them in thread order
    on the CPU. The relative-bias tables and the predefined score mods look up through it."""
    shape = torch.broadcast_shapes(*(i.shape for i in index))
    flat = index[0]
    for i, n in zip(index[1:], table.shape[1:len(index)]):
        flat = flat * n + i
    rest = table.shape[len(index):]
    rows = table.reshape(-1, *rest).index_select(0, flat.expand(shape).reshape(-1))
    return rows.reshape(*shape, *rest)


def relative_logits(q: Tensor, q_pos: Tensor, k_pos: Tensor, rel: RelativeBias) -> tuple[Tensor, bool]:
    """The relative term for queries ``q`` (..., heads, len(q_pos), d) against ``k_pos``.

    Returns (term, before_scale): ``before_scale`` says whether the term joins q·k before the
    softmax scale is applied (Shaw) or after (T5, ALiBi).
    """
    relative = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk): j - i
    if rel.kind == "shaw":
        K = rel.max_distance
        idx = relative.clamp(-K, K) + K  # (Tq, Tk)
        # table (2K+1, d) shared over heads or (H, 2K+1, d): either way (..., H, Tq, 2K+1)
        qe = torch.matmul(q, rel.table.transpose(-1, -2))
        index = idx.expand(qe.shape[:-2] + idx.shape)
        return torch.gather(qe, -1, index), True
    if rel.kind == "t5":
        bucket = t5_bucket(
            relative, bidirectional=rel.bidirectional, num_buckets=rel.num_buckets, max_distance=rel.max_distance
        )
        heads = torch.arange(rel.table.shape[0], device=bucket.device)[:, None, None]
        return table_lookup(rel.table, heads, bucket), False  # (H, Tq, Tk)
    slopes = rel.table  # alibi
    return -slopes[:, None, None] * relative.abs().to(slopes.dtype)[None], False
