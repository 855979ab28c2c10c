"""Scaled dot-product attention with every variant the models use.

``attention(q, k, v, ...)`` takes q shaped (batch, heads, q_len, head_dim) and k, v shaped
(batch, kv_heads, k_len, head_dim) with ``heads % kv_heads == 0`` (grouped-query attention:
query head h reads kv head ``h // (heads // kv_heads)``).

Positions. Queries are the *last* ``q_len`` positions of the key sequence (bottom-right
alignment): query i sits at absolute position ``k_len - q_len + i``. With q_len == k_len this is
ordinary self-attention; with q_len < k_len it is decoding against a KV cache.
``q_offset`` (an int or a 0-d integer tensor) overrides this: query i then sits at
``q_offset + i``. That is decoding against a *static* cache, a buffer of k_len slots of which
only the first ``q_offset + q_len`` are written: with ``causal`` the unwritten slots (j > i) are
never read. Only the dense paths take it (``auto`` then runs SDPA with a mask, or math).

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

Backends:
- ``"blockwise"``: flash-style exact attention (:class:`BlockwiseAttention`), tiled over queries
  and keys with an online softmax; saves only the output and the row log-sum-exp (O(T) extra
  memory), recomputes scores tile by tile in the backward, has a ``jvp`` rule (forward-mode AD),
  a generated vmap rule, and exact double backward. Every variant above, computed per tile from
  positions; key tiles outside the causal/window band are skipped (local attention is O(T·w)).
- ``"math"``: the dense composite reference (:func:`reference`), autograd-differentiated.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` (no relative bias; masks become dense bool masks).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` for standard attention, when installed.
- ``"auto"``: SDPA when the call needs no mask or bias (full, or causal with q_len == k_len or
  q_len == 1) and no forward-mode AD is active (nor vmap on CUDA, where SDPA's backward
  fails), else blockwise; dropout always runs on the math path, and so does a call under CPU
  bf16 autocast that takes a gradient (SDPA's CPU backward is slow there); without padding or a
  relative bias that call takes the math path's additive-bias form (mask as a 0/−inf bias and
  the scale inside one ``baddbmm``).
Derivations: ``proofs/attention.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import warnings

from ._util import forward_ad_active, vmap_active
from .registry import OpSpec, register

__all__ = [
    "attention", "blockwise", "BlockwiseAttention", "Sparsity", "RelativeBias", "allowed_mask", "relative_logits",
    "t5_bucket", "reference", "BACKENDS",
]

BACKENDS = ("auto", "math", "sdpa", "blockwise", "xformers")


@dataclass(frozen=True)
class Sparsity:
    """A fixed sparse pattern (Child et al. 2019): ``"strided"``, ``"fixed"`` or ``"block"``."""

    pattern: str
    stride: int = 0
    summary: int = 1
    block_size: int = 0
    layout: Optional[Tensor] = None  # (q_blocks, k_blocks) bool, for "block"

    def __post_init__(self):
        if self.pattern not in ("strided", "fixed", "block"):
            raise ValueError(f"sparsity pattern must be 'strided', 'fixed' or 'block', got {self.pattern!r}")
        if self.pattern in ("strided", "fixed") and (not isinstance(self.stride, int) or self.stride <= 0):
            raise ValueError(f"sparsity stride must be a positive int for {self.pattern!r}, got {self.stride!r}")
        if self.pattern == "fixed" and not (0 < self.summary <= self.stride):
            raise ValueError(f"sparsity summary must be in [1, stride={self.stride}], got {self.summary!r}")
        if self.pattern == "block":
            if not isinstance(self.block_size, int) or self.block_size <= 0:
                raise ValueError(f"block sparsity needs block_size > 0, got {self.block_size!r}")
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
        if not isinstance(self.max_distance, int) or self.max_distance <= 0:
            raise ValueError(f"relative_bias max_distance must be a positive int, got {self.max_distance!r}")


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, window, scale):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, seq, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree in batch, heads and length; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q_len ({q.shape[2]}) must not exceed k_len ({k.shape[2]})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (batch, k_len), True for real tokens; got "
                + (str(key_padding_mask.dtype) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__)
            )
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, k_len) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int, got {window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def allowed_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
) -> Tensor:
    """(len(q_pos), len(k_pos)) bool: which keys each query may read, from positions alone.

    Used whole by the dense path and tile by tile by tiled kernels. Key padding is separate.
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


def relative_logits(q: Tensor, q_pos: Tensor, k_pos: Tensor, rel: RelativeBias) -> tuple[Tensor, bool]:
    """The relative term for queries ``q`` (..., heads, len(q_pos), d) against ``k_pos``.

    Returns (term, before_scale): ``before_scale`` says whether the term joins q·k before the
    softmax scale is applied (Shaw) or after (T5, ALiBi).
    """
    relative = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk): j - i
    if rel.kind == "shaw":
        K = rel.max_distance
        idx = relative.clamp(-K, K) + K  # (Tq, Tk)
        table = rel.table
        if table.dim() == 2:  # (2K+1, d): shared over heads
            qe = torch.matmul(q, table.transpose(-1, -2))  # (..., H, Tq, 2K+1)
        else:  # (H, 2K+1, d)
            qe = torch.matmul(q, table.transpose(-1, -2))
        index = idx.expand(qe.shape[:-2] + idx.shape)
        return torch.gather(qe, -1, index), True
    if rel.kind == "t5":
        bucket = t5_bucket(
            relative, bidirectional=rel.bidirectional, num_buckets=rel.num_buckets, max_distance=rel.max_distance
        )
        return rel.table[:, bucket], False  # (H, Tq, Tk)
    slopes = rel.table  # alibi
    return -slopes[:, None, None] * relative.abs().to(slopes.dtype)[None], False


def _query_positions(Tq: int, Tk: int, q_offset, device) -> Tensor:
    """Absolute positions (Tq,) of the queries: the last Tq key positions, or from ``q_offset``."""
    if q_offset is None:
        return torch.arange(Tk - Tq, Tk, device=device)
    return torch.arange(Tq, device=device) + q_offset


def _expand_kv(k: Tensor, heads: int) -> Tensor:
    rep = heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
    relative_bias: Optional[RelativeBias] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    q_offset=None,
) -> Tensor:
    """Dense composite attention: the math every other backend must equal."""
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    q_pos = _query_positions(Tq, Tk, q_offset, q.device)
    k_pos = torch.arange(Tk, device=q.device)
    logits = torch.matmul(q, k.transpose(-1, -2))  # (B, H, Tq, Tk)
    if relative_bias is not None:
        term, before = relative_logits(q, q_pos, k_pos, relative_bias)
        if before:
            logits = (logits + term) * scale
        else:
            logits = logits * scale + term.to(logits.dtype)
    else:
        logits = logits * scale
    ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)  # (Tq, Tk)
    if key_padding_mask is not None:
        ok = ok & (key_padding_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :]))
    logits = logits.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash-style) attention: exact, O(T) extra memory, forward- and reverse-mode AD.
#
# Internally heads are split as (groups G = kv_heads, reps R = heads // kv_heads) so a query
# tile (B, G, R, bq, d) broadcasts against a key tile (B, G, 1, bk, d) without copying k or v
# for grouped-query attention. Derivations: proofs/attention.md.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Opts:
    """Everything static about one blockwise call (non-tensor Function argument)."""

    causal: bool
    window: Optional[int]
    sparsity: Optional[Sparsity]
    rel_kind: Optional[str]  # None, "shaw", "t5", "alibi"
    max_distance: int
    num_buckets: int
    bidirectional: bool
    scale: float
    block_q: int
    block_k: int


def _key_tiles(o: _Opts, Tq: int, Tk: int, qs: int, qe: int, has_padding: bool, device):
    """Yield (ks, ke, static_ok, diag) for the key tiles that query tile [qs, qe) must visit.

    Tiles entirely outside the causal/window band are skipped from integer arithmetic alone
    (this is what makes local attention O(T) in time); ``static_ok`` is the (bq, bk) bool mask
    from positions or None when every pair in the tile is allowed; ``diag`` (bq, bk) marks
    i == j, needed only with key padding (its exception) and only for tiles that hold it.
    """
    off = Tk - Tq
    i_lo, i_hi = off + qs, off + qe - 1  # absolute positions of the tile's queries
    w = o.window
    q_pos = None
    for ks in range(0, Tk, o.block_k):
        ke = min(ks + o.block_k, Tk)
        dmin, dmax = i_lo - (ke - 1), i_hi - ks  # range of d = i - j over the tile
        if o.causal and dmax < 0:
            continue
        if w is not None:
            if o.causal and dmin >= w:
                continue
            if not o.causal and (dmin >= w or dmax <= -w):
                continue
        full = o.sparsity is None
        if o.causal and dmin < 0:
            full = False
        if w is not None and (dmax >= w if o.causal else max(-dmin, dmax) >= w):
            full = False
        has_diag = max(i_lo, ks) <= min(i_hi, ke - 1)
        if q_pos is None and (not full or (has_padding and has_diag)):
            q_pos = torch.arange(i_lo, i_hi + 1, device=device)
        k_pos = torch.arange(ks, ke, device=device) if q_pos is not None else None
        ok = None
        if not full:
            ok = allowed_mask(q_pos, k_pos, causal=o.causal, window=w, sparsity=o.sparsity)
            if o.sparsity is not None:  # pattern-only tiles: decide from the (position-only) mask
                if not bool(ok.any()):
                    continue
                if bool(ok.all()):
                    ok = None
        diag = (q_pos[:, None] == k_pos[None, :]) if (has_padding and has_diag) else None
        yield ks, ke, ok, diag


def _tile_positions(o: _Opts, Tq: int, Tk: int, qs: int, qe: int, ks: int, ke: int, device) -> Tensor:
    """(bq, bk) relative offsets j - i for the tile (long)."""
    off = Tk - Tq
    return torch.arange(ks, ke, device=device)[None, :] - torch.arange(off + qs, off + qe, device=device)[:, None]


class _Tables:
    """Per-tile views of the relative-position term and its index (shaw idx / t5 bucket / alibi distance)."""

    def __init__(self, o: _Opts, table: Optional[Tensor], G: int, R: int, dtype):
        self.o, self.kind = o, o.rel_kind
        self.table5 = None
        if self.kind == "shaw":  # (2K+1, d) shared, or (H, 2K+1, d) -> (G, R, 2K+1, d)
            self.table5 = table if table.dim() == 2 else table.reshape(G, R, *table.shape[1:])
        elif self.kind == "t5":  # (H, buckets) -> (G, R, buckets)
            self.table5 = table.reshape(G, R, table.shape[-1])
        elif self.kind == "alibi":  # (H,) -> (G, R, 1, 1)
            self.table5 = table.reshape(G, R, 1, 1)

    def index(self, rel: Tensor) -> Tensor:
        o = self.o
        if self.kind == "shaw":
            return rel.clamp(-o.max_distance, o.max_distance) + o.max_distance
        if self.kind == "t5":
            return t5_bucket(rel, bidirectional=o.bidirectional, num_buckets=o.num_buckets, max_distance=o.max_distance)
        return rel.abs()


def _gather_last(x: Tensor, idx: Tensor) -> Tensor:
    """x (..., bq, n), idx (bq, bk) -> (..., bq, bk) with out[..., a, b] = x[..., a, idx[a, b]]."""
    return torch.gather(x, -1, idx.expand(x.shape[:-1] + idx.shape[-1:]))


def _logits(o, tabs, q_t, k_t, qe_t, idx, dtype) -> Tensor:
    """Scaled logits of one tile (B, G, R, bq, bk); qe_t = q_t @ table^T for Shaw (precomputed per q tile)."""
    s = torch.matmul(q_t, k_t.transpose(-1, -2))
    if tabs.kind == "shaw":
        return (s + _gather_last(qe_t, idx)) * o.scale
    s = s * o.scale
    if tabs.kind == "t5":
        return s + tabs.table5[..., idx].to(dtype)
    if tabs.kind == "alibi":
        return s - tabs.table5.to(dtype) * idx.to(dtype)
    return s


def _tile_ok(static_ok, diag, kpm, ks, ke):
    """Combine the position mask and key padding into one broadcastable bool mask, or None."""
    ok = static_ok
    if kpm is not None:
        kp = kpm[:, None, None, None, ks:ke]  # (B, 1, 1, 1, bk)
        if diag is not None:
            kp = kp | diag
        ok = kp if ok is None else (kp & ok)
    return ok


def _split_heads(q, k, v):
    B, H, Tq, d = q.shape
    G = k.shape[1]
    R = H // G
    return q.reshape(B, G, R, Tq, d), k.reshape(B, G, 1, k.shape[2], d), v.reshape(B, G, 1, v.shape[2], v.shape[-1]), G, R


def _blockwise_forward(q, k, v, kpm, table, o: _Opts):
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    q5, k5, v5, G, R = _split_heads(q, k, v)
    tabs = _Tables(o, table, G, R, q.dtype)
    outs, lses = [], []
    for qs in range(0, Tq, o.block_q):
        qe = min(qs + o.block_q, Tq)
        q_t = q5[..., qs:qe, :]
        qe_t = torch.matmul(q_t, tabs.table5.transpose(-1, -2)) if tabs.kind == "shaw" else None
        m = l = acc = None
        for ks, ke, static_ok, diag in _key_tiles(o, Tq, Tk, qs, qe, kpm is not None, q.device):
            idx = tabs.index(_tile_positions(o, Tq, Tk, qs, qe, ks, ke, q.device)) if tabs.kind else None
            s = _logits(o, tabs, q_t, k5[..., ks:ke, :], qe_t, idx, q.dtype)
            ok = _tile_ok(static_ok, diag, kpm, ks, ke)
            if ok is not None:
                s = s.masked_fill(~ok, float("-inf"))
            s_max = s.amax(-1)
            m_new = s_max if m is None else torch.maximum(m, s_max)
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing allowed yet
            p = torch.exp(s - m_safe[..., None])
            pv = torch.matmul(p, v5[..., ks:ke, :])
            if m is None:
                l, acc = p.sum(-1), pv
            else:
                alpha = torch.exp(m - m_safe)
                l = l * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + pv
            m = m_new
        outs.append(acc / l[..., None])
        lses.append(m + torch.log(l))
    out = torch.cat(outs, dim=-2).reshape(B, H, Tq, v.shape[-1])
    lse = torch.cat(lses, dim=-1).reshape(B, H, Tq)
    return out, lse


def _blockwise_backward(q, k, v, kpm, table, out, lse, d_out, d_lse, o: _Opts, need_table: bool):
    B, H, Tq, dh = q.shape
    Tk = k.shape[2]
    q5, k5, v5, G, R = _split_heads(q, k, v)
    tabs = _Tables(o, table, G, R, q.dtype)
    out5 = out.reshape(B, G, R, Tq, v.shape[-1])
    lse5 = lse.reshape(B, G, R, Tq)
    dO5 = torch.zeros_like(out5) if d_out is None else d_out.reshape(out5.shape)
    # D_i = rowsum(dO ∘ O) - dlse_i: the row constant subtracted in dS = P ∘ (dP − D)
    D = (dO5 * out5).sum(-1)
    if d_lse is not None:
        D = D - d_lse.reshape(D.shape)
    n_k = (Tk + o.block_k - 1) // o.block_k
    dk_parts, dv_parts = [None] * n_k, [None] * n_k
    dq_parts = []
    d_table = None
    for qs in range(0, Tq, o.block_q):
        qe = min(qs + o.block_q, Tq)
        q_t, dO_t, lse_t, D_t = q5[..., qs:qe, :], dO5[..., qs:qe, :], lse5[..., qs:qe], D[..., qs:qe]
        qe_t = torch.matmul(q_t, tabs.table5.transpose(-1, -2)) if tabs.kind == "shaw" else None
        dq_t = torch.zeros_like(q_t)
        g_rel = torch.zeros_like(qe_t) if tabs.kind == "shaw" else None  # (B, G, R, bq, 2K+1)
        for ks, ke, static_ok, diag in _key_tiles(o, Tq, Tk, qs, qe, kpm is not None, q.device):
            k_t, v_t = k5[..., ks:ke, :], v5[..., ks:ke, :]
            idx = tabs.index(_tile_positions(o, Tq, Tk, qs, qe, ks, ke, q.device)) if tabs.kind else None
            s = _logits(o, tabs, q_t, k_t, qe_t, idx, q.dtype)
            ok = _tile_ok(static_ok, diag, kpm, ks, ke)
            if ok is not None:
                s = s.masked_fill(~ok, float("-inf"))
            p = torch.exp(s - lse_t[..., None])  # exact probabilities, from the saved lse
            dP = torch.matmul(dO_t, v_t.transpose(-1, -2))
            dS = p * (dP - D_t[..., None])  # gradient wrt the scaled logits
            j = ks // o.block_k
            dv_j = torch.matmul(p.transpose(-1, -2), dO_t).sum(2, keepdim=True)
            dS_raw = dS * o.scale  # wrt the unscaled q·k (and q·e for Shaw); t5/alibi tables take dS itself
            dq_t = dq_t + torch.matmul(dS_raw, k_t)
            dk_j = torch.matmul(dS_raw.transpose(-1, -2), q_t).sum(2, keepdim=True)
            dk_parts[j] = dk_j if dk_parts[j] is None else dk_parts[j] + dk_j
            dv_parts[j] = dv_j if dv_parts[j] is None else dv_parts[j] + dv_j
            if tabs.kind == "shaw":
                g_rel = g_rel.scatter_add(-1, idx.expand(dS_raw.shape), dS_raw)
            elif tabs.kind == "t5" and need_table:
                flat = dS.sum(0).reshape(G, R, -1)  # (G, R, bq*bk)
                upd = torch.zeros(G, R, o.num_buckets, dtype=dS.dtype, device=dS.device)
                upd = upd.scatter_add(-1, idx.flatten().expand(flat.shape), flat)
                d_table = upd if d_table is None else d_table + upd
            elif tabs.kind == "alibi" and need_table:
                upd = -(dS.sum(0) * idx.to(dS.dtype)).sum((-1, -2))  # (G, R)
                d_table = upd if d_table is None else d_table + upd
        if tabs.kind == "shaw":
            dq_t = dq_t + torch.matmul(g_rel, tabs.table5)
            if need_table:
                upd = torch.matmul(g_rel.transpose(-1, -2), q_t)  # (B, G, R, 2K+1, d)
                upd = upd.sum((0, 1, 2)) if tabs.table5.dim() == 2 else upd.sum(0)
                d_table = upd if d_table is None else d_table + upd
        dq_parts.append(dq_t)
    dq = torch.cat(dq_parts, dim=-2).reshape(q.shape)
    zeros_k = lambda t, s, e: torch.zeros(B, G, 1, e - s, t.shape[-1], dtype=t.dtype, device=t.device)
    dk = torch.cat(
        [p if p is not None else zeros_k(k, j * o.block_k, min((j + 1) * o.block_k, Tk)) for j, p in enumerate(dk_parts)],
        dim=-2,
    ).reshape(k.shape)
    dv = torch.cat(
        [p if p is not None else zeros_k(v, j * o.block_k, min((j + 1) * o.block_k, Tk)) for j, p in enumerate(dv_parts)],
        dim=-2,
    ).reshape(v.shape)
    if d_table is not None:
        d_table = d_table.reshape(table.shape).to(table.dtype)
    elif need_table:
        d_table = torch.zeros_like(table)
    return dq, dk, dv, d_table


def _blockwise_jvp(q, k, v, kpm, table, out, lse, tq, tk, tv, ttable, o: _Opts):
    """Tangents (dO, dlse) of (O, lse): dS from the input tangents, then
    dlse = rowsum(P ∘ dS), dO = (P ∘ dS) V − dlse ∘ O + P dV, tile by tile with the saved lse."""
    B, H, Tq, dh = q.shape
    Tk = k.shape[2]
    q5, k5, v5, G, R = _split_heads(q, k, v)
    tq5 = None if tq is None else tq.reshape(q5.shape)
    tk5 = None if tk is None else tk.reshape(k5.shape)
    tv5 = None if tv is None else tv.reshape(v5.shape)
    tabs = _Tables(o, table, G, R, q.dtype)
    ttabs = _Tables(o, ttable, G, R, q.dtype) if (ttable is not None and tabs.kind) else None
    out5 = out.reshape(B, G, R, Tq, v.shape[-1])
    lse5 = lse.reshape(B, G, R, Tq)
    d_outs, d_lses = [], []
    for qs in range(0, Tq, o.block_q):
        qe = min(qs + o.block_q, Tq)
        q_t, lse_t = q5[..., qs:qe, :], lse5[..., qs:qe]
        tq_t = None if tq5 is None else tq5[..., qs:qe, :]
        qe_t = dqe_t = None
        if tabs.kind == "shaw":
            qe_t = torch.matmul(q_t, tabs.table5.transpose(-1, -2))
            if tq_t is not None:
                dqe_t = torch.matmul(tq_t, tabs.table5.transpose(-1, -2))
            if ttabs is not None:
                t = torch.matmul(q_t, ttabs.table5.transpose(-1, -2))
                dqe_t = t if dqe_t is None else dqe_t + t
        acc = torch.zeros_like(out5[..., qs:qe, :])
        c = torch.zeros_like(lse_t)
        for ks, ke, static_ok, diag in _key_tiles(o, Tq, Tk, qs, qe, kpm is not None, q.device):
            k_t, v_t = k5[..., ks:ke, :], v5[..., ks:ke, :]
            idx = tabs.index(_tile_positions(o, Tq, Tk, qs, qe, ks, ke, q.device)) if tabs.kind else None
            s = _logits(o, tabs, q_t, k_t, qe_t, idx, q.dtype)
            ok = _tile_ok(static_ok, diag, kpm, ks, ke)
            if ok is not None:
                s = s.masked_fill(~ok, float("-inf"))
            p = torch.exp(s - lse_t[..., None])
            ds = None  # tangent of the scaled logits
            if tq_t is not None:
                ds = torch.matmul(tq_t, k_t.transpose(-1, -2))
            if tk5 is not None:
                t = torch.matmul(q_t, tk5[..., ks:ke, :].transpose(-1, -2))
                ds = t if ds is None else ds + t
            if dqe_t is not None:
                t = _gather_last(dqe_t, idx)
                ds = t if ds is None else ds + t
            if ds is not None:
                ds = ds * o.scale
            if ttabs is not None and tabs.kind in ("t5", "alibi"):
                t = ttabs.table5[..., idx] if tabs.kind == "t5" else -ttabs.table5 * idx.to(q.dtype)
                ds = t.to(q.dtype) if ds is None else ds + t
            if ds is not None:
                pds = p * ds
                c = c + pds.sum(-1)
                acc = acc + torch.matmul(pds, v_t)
            if tv5 is not None:
                acc = acc + torch.matmul(p, tv5[..., ks:ke, :])
        d_outs.append(acc - c[..., None] * out5[..., qs:qe, :])
        d_lses.append(c)
    return torch.cat(d_outs, dim=-2).reshape(out.shape), torch.cat(d_lses, dim=-1).reshape(lse.shape)


class BlockwiseAttention(torch.autograd.Function):
    """Flash-style exact attention (functorch form). Inputs (q, k, v, key_padding_mask | None,
    table | None, opts: _Opts); outputs (out, lse). Saves only inputs, out and lse: O(T) memory.

    The backward is written in differentiable torch ops on the saved tensors (out and lse are
    outputs of this Function, so their own gradients flow), hence double backward and
    forward-over-reverse (hvp) are exact; only the double-backward *graph* is O(T²).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, key_padding_mask, table, opts):
        return _blockwise_forward(q, k, v, key_padding_mask, table, opts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kpm, table, opts = inputs
        out, lse = output
        ctx.opts = opts
        ctx.save_for_backward(q, k, v, kpm, table, out, lse)
        ctx.save_for_forward(q, k, v, kpm, table, out, lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, kpm, table, out, lse = ctx.saved_tensors
        need_table = table is not None and ctx.needs_input_grad[4]
        if d_out is None and d_lse is None:
            return None, None, None, None, None, None
        dq, dk, dv, dt = _blockwise_backward(q, k, v, kpm, table, out, lse, d_out, d_lse, ctx.opts, need_table)
        return dq, dk, dv, None, dt, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tkpm, ttable, _topts):
        q, k, v, kpm, table, out, lse = ctx.saved_tensors
        return _blockwise_jvp(q, k, v, kpm, table, out, lse, tq, tk, tv, ttable, ctx.opts)


def _check_relative(rel: Optional[RelativeBias], q: Tensor):
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


def blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
    relative_bias: Optional[RelativeBias] = None,
    scale: Optional[float] = None,
    block_q: int = 128,
    block_k: int = 128,
) -> Tensor:
    """The blockwise backend alone (no dispatch); same semantics as :func:`attention`."""
    rel = relative_bias
    low = q.dtype in (torch.float16, torch.bfloat16)
    opts = _Opts(
        causal=bool(causal),
        window=window,
        sparsity=sparsity,
        rel_kind=None if rel is None else rel.kind,
        max_distance=128 if rel is None else rel.max_distance,
        num_buckets=32 if rel is None else rel.num_buckets,
        bidirectional=True if rel is None else rel.bidirectional,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        block_q=block_q,
        block_k=block_k,
    )
    table = None if rel is None else rel.table
    # The kernel chooses its own precision: under autocast its matmuls would silently drop to
    # bf16/fp16 in the forward while the backward (run outside autocast) mixes dtypes.
    with torch.autocast(q.device.type, enabled=False):
        if low:  # accumulate in float32, return in the input dtype
            q32, k32, v32 = q.float(), k.float(), v.float()
            t32 = None if table is None else table.float()
            return BlockwiseAttention.apply(q32, k32, v32, key_padding_mask, t32, opts)[0].to(q.dtype)
        if table is not None:
            table = table.to(q.dtype)
        return BlockwiseAttention.apply(q, k, v, key_padding_mask, table, opts)[0]


# ----------------------------------------------------------------------------------------------
# SDPA and xformers backends, dispatch
# ----------------------------------------------------------------------------------------------


def _mask_free(causal, key_padding_mask, window, sparsity, Tq, Tk) -> bool:
    """True when SDPA can run the call with its fused kernels (no explicit T×T mask).

    A single causal query in the last position reads every key, so it needs no mask either.
    """
    return key_padding_mask is None and window is None and sparsity is None and (not causal or Tq == Tk or Tq == 1)


def _cpu_bf16_autocast_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True under CPU bf16 autocast while a gradient is taken: there SDPA's CPU backward is
    slow (fwd+bwd 18.4 ms vs 7.0 ms on the math path at (8, 8, 128, 32), one thread; in fp32
    SDPA wins, 9.0 vs 11.4 ms; docs/benchmarks.md), so ``auto`` takes the math path."""
    return (
        q.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


def _dense_bias(q, k, v, *, causal, window, sparsity, scale):
    """The dense math path with the mask as an additive 0/−inf bias and the scale folded into one
    ``baddbmm`` (no key padding, no relative bias): scores = bias + scale · q kᵀ in one kernel,
    instead of a matmul, a scale pass and a masked_fill pass over the (B, H, Tq, Tk) scores
    forward and backward. ``auto`` uses it under CPU bf16 autocast with a gradient, where the
    dense path beats SDPA's CPU backward. Equal to :func:`reference` (the same masked softmax:
    exp(−inf) = 0 and its gradient is 0 there)."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    q_pos = _query_positions(Tq, Tk, None, q.device)
    ok = allowed_mask(q_pos, torch.arange(Tk, device=q.device), causal=causal, window=window, sparsity=sparsity)
    bias = torch.zeros((Tq, Tk), dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
    logits = torch.baddbmm(bias, q.reshape(B * H, Tq, d), k.reshape(B * H, Tk, d).transpose(1, 2), alpha=scale)
    probs = torch.softmax(logits, dim=-1)
    return torch.bmm(probs, v.reshape(B * H, Tk, -1)).reshape(B, H, Tq, -1)


def _sdpa(q, k, v, *, causal, key_padding_mask, window, sparsity, scale, q_offset=None):
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    gqa = H != k.shape[1]
    plain = key_padding_mask is None and window is None and sparsity is None and q_offset is None
    if plain and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if plain and (not causal or Tq == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    q_pos = _query_positions(Tq, Tk, q_offset, q.device)
    k_pos = torch.arange(Tk, device=q.device)
    ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)
    if key_padding_mask is not None:
        ok = ok & (key_padding_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, scale=scale, enable_gqa=gqa)


def _xformers(q, k, v, *, causal, key_padding_mask, window, sparsity, scale):
    try:
        import xformers.ops as xops  # type: ignore
    except ImportError as e:
        raise ImportError(
            "backend='xformers' needs the 'xformers' package (pip install xformers); "
            "use backend='blockwise' for memory-efficient attention without it"
        ) from e
    Tq, Tk = q.shape[2], k.shape[2]
    if key_padding_mask is not None or window is not None or sparsity is not None:
        raise ValueError("backend='xformers' supports standard (causal or full) attention only; use 'blockwise'")
    bias = None
    if causal:
        bias = xops.LowerTriangularMask() if Tq == Tk else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, q.shape[1]) if rep > 1 else k, _expand_kv(v, q.shape[1]) if rep > 1 else v
    t = lambda x: x.transpose(1, 2)  # xformers wants (batch, seq, heads, head_dim)
    return t(xops.memory_efficient_attention(t(q), t(k), t(v), attn_bias=bias, scale=scale))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
    relative_bias: Optional[RelativeBias] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    block_q: int = 128,
    block_k: int = 128,
    q_offset=None,
) -> Tensor:
    """Attention over (batch, heads, seq, head_dim) tensors; see the module docstring for semantics.

    ``dropout_p`` drops attention probabilities with masks drawn from ``generator`` (or the
    global RNG, which follows ``vmap(randomness=...)``); it always runs on the math path (the
    blockwise kernel has no dropout: ``backend='blockwise'`` with dropout falls back to math
    with a warning). ``block_q``/``block_k`` are the blockwise tile sizes. ``q_offset`` places
    the queries at ``q_offset + i`` (a static KV cache); backends 'math', 'sdpa' and 'auto' only.
    """
    _check(q, k, v, key_padding_mask, window, scale)
    if q_offset is not None:
        if isinstance(q_offset, bool) or not (
            isinstance(q_offset, int) or (isinstance(q_offset, Tensor) and q_offset.dim() == 0
                                          and not q_offset.is_floating_point())
        ):
            raise TypeError(f"q_offset must be an int or a 0-d integer tensor, got {q_offset!r}")
        if backend in ("blockwise", "xformers"):
            raise ValueError(f"q_offset (a static KV cache) runs on backends 'math', 'sdpa' or 'auto', not {backend!r}")
    _check_relative(relative_bias, q)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    if sparsity is not None and not isinstance(sparsity, Sparsity):
        raise TypeError(f"sparsity must be a Sparsity, got {type(sparsity).__name__}")
    if relative_bias is not None and not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"relative_bias must be a RelativeBias, got {type(relative_bias).__name__}")
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, window=window, sparsity=sparsity, scale=scale)
    sdpa_ok = relative_bias is None and dropout_p == 0.0 and q.dtype == k.dtype == v.dtype
    if backend == "sdpa":
        if not sdpa_ok:
            raise ValueError(
                "backend='sdpa' cannot run this call: "
                + ("relative_bias is set" if relative_bias is not None else "dropout with an explicit mask")
                + "; use backend='blockwise', 'math' or 'auto'"
            )
        return _sdpa(q, k, v, q_offset=q_offset, **kwargs)
    if q_offset is not None:  # math or auto: SDPA with a dense mask where it can, else the math path
        # While compiling, the math path: inductor fuses its mask, softmax and matmuls, and a
        # compiled decode step ran 7-13% faster than with SDPA (docs/benchmarks.md).
        compiling = torch.compiler.is_compiling()
        fwd_ad = not compiling and forward_ad_active()
        if backend == "auto" and sdpa_ok and not fwd_ad and not compiling and not _cpu_bf16_autocast_grad(q, k, v):
            return _sdpa(q, k, v, q_offset=q_offset, **kwargs)
        return reference(q, k, v, relative_bias=relative_bias, dropout_p=dropout_p, generator=generator,
                         q_offset=q_offset, **kwargs)
    if backend == "xformers":
        if relative_bias is not None or dropout_p > 0.0:
            raise ValueError("backend='xformers' supports neither relative_bias nor dropout here; use 'blockwise' or 'math'")
        return _xformers(q, k, v, **kwargs)
    if backend == "math" or dropout_p > 0.0:
        if backend == "blockwise":
            _warn_dropout_fallback()
        return reference(q, k, v, relative_bias=relative_bias, dropout_p=dropout_p, generator=generator, **kwargs)
    if backend == "auto":
        Tq, Tk = q.shape[2], k.shape[2]
        if _cpu_bf16_autocast_grad(q, k, v):
            if relative_bias is None and key_padding_mask is None:
                return _dense_bias(q, k, v, causal=causal, window=window, sparsity=sparsity, scale=scale)
            return reference(q, k, v, relative_bias=relative_bias, **kwargs)
        # Under vmap SDPA's CPU kernel has no batching rule (a per-example loop, with a warning),
        # yet measured it still beats the math path (docs/benchmarks.md), so it stays. On CUDA
        # its memory-efficient backward fails under vmap ("LSE is not correctly aligned"), so
        # vmapped CUDA calls take the blockwise kernel.
        eager = not torch.compiler.is_compiling()  # dynamo cannot trace the transform checks
        fwd_ad = eager and forward_ad_active()
        cuda_vmap = eager and q.device.type == "cuda" and vmap_active()
        if sdpa_ok and not fwd_ad and not cuda_vmap and _mask_free(causal, key_padding_mask, window, sparsity, Tq, Tk):
            return _sdpa(q, k, v, **kwargs)
    return blockwise(q, k, v, relative_bias=relative_bias, block_q=block_q, block_k=block_k, **kwargs)


def _warn_dropout_fallback():
    # Python's default filter shows it once per calling location; a module-level "warned" flag
    # would hide it from every later caller (and made tests depend on their order).
    warnings.warn(
        "backend='blockwise' has no attention dropout; calls with dropout_p > 0 run on the dense math path",
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------
# Registration: float64 samples that exercise tiling, GQA, padding, every variant.
# ----------------------------------------------------------------------------------------------


def _op(q, k, v, table=None, *, kind=None, **kw):
    rel = None if kind is None else RelativeBias(kind, table, max_distance=kw.pop("max_distance", 3), num_buckets=kw.pop("num_buckets", 4))
    return attention(q, k, v, relative_bias=rel, backend="blockwise", block_q=3, block_k=3, **kw)


def _ref(q, k, v, table=None, *, kind=None, **kw):
    rel = None if kind is None else RelativeBias(kind, table, max_distance=kw.pop("max_distance", 3), num_buckets=kw.pop("num_buckets", 4))
    return reference(q, k, v, relative_bias=rel, **kw)


def _samples() -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    B, H, Hkv, T, d = 1, 2, 1, 6, 2
    kpm = torch.tensor([[False, True, True, False, True, True]])
    return [
        ((r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d)), dict(causal=True, key_padding_mask=kpm)),
        ((r(B, H, 4, d), r(B, H, T, d), r(B, H, T, d)), dict(causal=False, window=3)),
        ((r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)), dict(causal=True, sparsity=Sparsity("strided", stride=2))),
        ((r(B, H, T, d), r(B, H, T, d), r(B, H, T, d), r(5, d)), dict(causal=True, kind="shaw", max_distance=2)),
        ((r(B, H, T, d), r(B, H, T, d), r(B, H, T, d), r(H, 4)), dict(causal=False, kind="t5")),
        ((r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d), r(H).abs().detach().requires_grad_()), dict(causal=True, kind="alibi")),
    ]


register(
    OpSpec(
        name="attention",
        function=BlockwiseAttention,
        op=_op,
        reference=_ref,
        proof="proofs/attention.md",
        samples=_samples,
        supports_forward_ad=True,
        supports_double_backward=True,
    )
)
