"""Blockwise (flash-style) attention: exact, O(T) extra memory, forward- and reverse-mode AD.

:class:`BlockwiseAttention` tiles queries and keys and runs an online softmax; it saves only the
output and the row log-sum-exp, recomputes each tile's scores in the backward, has a ``jvp``
rule (forward-mode AD), a generated vmap rule, and exact double backward. Every mask and
relative bias of :mod:`.masks` is computed per tile from positions; key tiles outside the
causal/window band are skipped (local attention is O(T·w)). Its registered twin is the dense
:func:`aam_func.ops.attention.dense.reference`.

Internally heads are split as (groups G = kv_heads, reps R = heads // kv_heads) so a query
tile (B, G, R, bq, d) broadcasts against a key tile (B, G, 1, bk, d) without copying k or v
for grouped-query attention. Forward, backward and jvp share one tile-scores computation
(:meth:`_Tiling.scores`). Derivations: proofs/attention.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ..registry import OpSpec, register
from .dense import reference
from .masks import RelativeBias, Sparsity, allowed_mask, t5_bucket

__all__ = ["BlockwiseAttention", "blockwise", "Opts", "Tile", "key_tiles"]


@dataclass(frozen=True)
class Opts:
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


class Tile(NamedTuple):
    """Query rows [qs, qe) against key columns [ks, ke); ``static_ok`` (bq, bk) bool mask from
    positions, None when every pair is allowed; ``diag`` (bq, bk) marks i == j, only with key
    padding (its exception) and only for tiles that hold the diagonal."""

    qs: int
    qe: int
    ks: int
    ke: int
    static_ok: Optional[Tensor]
    diag: Optional[Tensor]


def key_tiles(o: Opts, Tq: int, Tk: int, qs: int, qe: int, has_padding: bool, device) -> Iterator[Tile]:
    """The key tiles that query tile [qs, qe) must visit.

    Tiles entirely outside the causal/window band are skipped from integer arithmetic alone
    (this is what makes local attention O(T) in time); sparse patterns are decided from the
    tile's position mask (all-false: skip; all-true: no mask).
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
        yield Tile(qs, qe, ks, ke, ok, diag)


def _add(total: Optional[Tensor], part: Tensor) -> Tensor:
    return part if total is None else total + part


def _gather_last(x: Tensor, idx: Tensor) -> Tensor:
    """x (..., bq, n), idx (bq, bk) -> (..., bq, bk) with out[..., a, b] = x[..., a, idx[a, b]]."""
    return torch.gather(x, -1, idx.expand(x.shape[:-1] + idx.shape[-1:]))


class _Tables:
    """The relative-position table in (G, R, ...) form, its per-tile index (Shaw: clipped offset,
    T5: bucket, ALiBi: distance) and the table's share of a tile's gradient."""

    def __init__(self, o: Opts, table: Optional[Tensor], G: int, R: int):
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

    def project(self, q_t: Tensor) -> Optional[Tensor]:
        """Shaw: q_t Eᵀ (B, G, R, bq, 2K+1), computed once per query tile; None otherwise."""
        return torch.matmul(q_t, self.table5.transpose(-1, -2)) if self.kind == "shaw" else None

    def bias_grad(self, dS: Tensor, idx: Tensor) -> Tensor:
        """T5 / ALiBi: the table's gradient from one tile's dL (B, G, R, bq, bk), as (G, R[, buckets])."""
        if self.kind == "t5":  # dT[h, r] = Σ_{b,i,j: bucket = r} dL_ij
            flat = dS.sum(0).reshape(*self.table5.shape[:2], -1)  # (G, R, bq*bk)
            upd = torch.zeros(*self.table5.shape[:2], self.o.num_buckets, dtype=dS.dtype, device=dS.device)
            return upd.scatter_add(-1, idx.flatten().expand(flat.shape), flat)
        return -(dS.sum(0) * idx.to(dS.dtype)).sum((-1, -2))  # ALiBi: ds_h = −Σ dL_ij |i − j|

    def shaw_grad(self, g_rel: Tensor, q_t: Tensor) -> Tensor:
        """Shaw: dE += gᵀ q for one query tile, summed over batch (and heads for a shared table)."""
        upd = torch.matmul(g_rel.transpose(-1, -2), q_t)  # (B, G, R, 2K+1, d)
        return upd.sum((0, 1, 2)) if self.table5.dim() == 2 else upd.sum(0)


class _Tiling:
    """One call's q, k, v split by head group, and the per-tile pieces forward, backward and jvp share."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], table: Optional[Tensor], o: Opts):
        B, H, Tq, d = q.shape
        self.G = k.shape[1]
        self.R = H // self.G
        self.q5 = q.reshape(B, self.G, self.R, Tq, d)
        self.k5 = k.reshape(B, self.G, 1, k.shape[2], d)
        self.v5 = v.reshape(B, self.G, 1, v.shape[2], v.shape[-1])
        self.o, self.kpm, self.Tq, self.Tk = o, kpm, Tq, k.shape[2]
        self.dtype, self.device = q.dtype, q.device
        self.tabs = _Tables(o, table, self.G, self.R)

    def query_tiles(self) -> Iterator[tuple[int, int]]:
        for qs in range(0, self.Tq, self.o.block_q):
            yield qs, min(qs + self.o.block_q, self.Tq)

    def key_tiles(self, qs: int, qe: int) -> Iterator[Tile]:
        return key_tiles(self.o, self.Tq, self.Tk, qs, qe, self.kpm is not None, self.device)

    def key_slice(self, x5: Tensor, t: Tile) -> Tensor:
        """The tile's keys (or values, or their tangents): x5[..., ks:ke, :]."""
        return x5[..., t.ks:t.ke, :]

    def scores(self, q_t: Tensor, k_t: Tensor, qe_t: Optional[Tensor], t: Tile) -> tuple[Tensor, Optional[Tensor]]:
        """The tile's scaled, masked logits S (B, G, R, bq, bk) and its relative index (or None):

            S_ij = c (q_i·k_j + q_i·E[idx_ij])  (Shaw),  c q_i·k_j + T[h, idx_ij]  (T5),
                   c q_i·k_j − s_h idx_ij  (ALiBi),  c q_i·k_j  (none);  −∞ where not allowed.
        """
        o, tabs = self.o, self.tabs
        idx = None
        if tabs.kind:
            off = self.Tk - self.Tq
            rel = (torch.arange(t.ks, t.ke, device=self.device)[None, :]
                   - torch.arange(off + t.qs, off + t.qe, device=self.device)[:, None])  # (bq, bk): j - i
            idx = tabs.index(rel)
        s = torch.matmul(q_t, k_t.transpose(-1, -2))
        if tabs.kind == "shaw":
            s = (s + _gather_last(qe_t, idx)) * o.scale
        else:
            s = s * o.scale
            if tabs.kind == "t5":
                s = s + tabs.table5[..., idx].to(self.dtype)
            elif tabs.kind == "alibi":
                s = s - tabs.table5.to(self.dtype) * idx.to(self.dtype)
        ok = t.static_ok
        if self.kpm is not None:
            kp = self.kpm[:, None, None, None, t.ks:t.ke]  # (B, 1, 1, 1, bk)
            if t.diag is not None:
                kp = kp | t.diag
            ok = kp if ok is None else (kp & ok)
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
        return s, idx


def _blockwise_forward(q, k, v, kpm, table, o: Opts):
    """(out, lse) by the online softmax over key tiles (proofs/attention.md §2)."""
    B, H, Tq, _ = q.shape
    tiling = _Tiling(q, k, v, kpm, table, o)
    outs, lses = [], []
    for qs, qe in tiling.query_tiles():
        q_t = tiling.q5[..., qs:qe, :]
        qe_t = tiling.tabs.project(q_t)
        m = l = acc = None
        for tile in tiling.key_tiles(qs, qe):
            s, _ = tiling.scores(q_t, tiling.key_slice(tiling.k5, tile), qe_t, tile)
            s_max = s.amax(-1)
            m_new = s_max if m is None else torch.maximum(m, s_max)
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing allowed yet
            p = torch.exp(s - m_safe[..., None])
            pv = torch.matmul(p, tiling.key_slice(tiling.v5, tile))
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


def _join_key_parts(parts: list, like: Tensor, o: Opts) -> Tensor:
    """Per-key-tile gradients (None for tiles no query visited) joined into ``like``'s shape."""
    B, G, Tk = like.shape[0], like.shape[1], like.shape[2]
    zeros = lambda s, e: torch.zeros(B, G, 1, e - s, like.shape[-1], dtype=like.dtype, device=like.device)  # noqa: E731
    return torch.cat(
        [p if p is not None else zeros(j * o.block_k, min((j + 1) * o.block_k, Tk)) for j, p in enumerate(parts)],
        dim=-2,
    ).reshape(like.shape)


def _blockwise_backward(q, k, v, kpm, table, out, lse, d_out, d_lse, o: Opts, need_table: bool):
    """(dq, dk, dv, d_table) from dS = P ∘ (dP − D), tile by tile with the saved lse (proofs §3)."""
    B, H, Tq, _ = q.shape
    tiling = _Tiling(q, k, v, kpm, table, o)
    tabs = tiling.tabs
    out5 = out.reshape(B, tiling.G, tiling.R, Tq, v.shape[-1])
    lse5 = lse.reshape(B, tiling.G, tiling.R, Tq)
    dO5 = torch.zeros_like(out5) if d_out is None else d_out.reshape(out5.shape)
    # D_i = rowsum(dO ∘ O) - dlse_i: the row constant subtracted in dS = P ∘ (dP − D)
    D = (dO5 * out5).sum(-1)
    if d_lse is not None:
        D = D - d_lse.reshape(D.shape)
    n_k = (tiling.Tk + o.block_k - 1) // o.block_k
    dk_parts, dv_parts = [None] * n_k, [None] * n_k
    dq_parts, d_table = [], None
    for qs, qe in tiling.query_tiles():
        q_t, dO_t, lse_t, D_t = tiling.q5[..., qs:qe, :], dO5[..., qs:qe, :], lse5[..., qs:qe], D[..., qs:qe]
        qe_t = tabs.project(q_t)
        dq_t = torch.zeros_like(q_t)
        g_rel = torch.zeros_like(qe_t) if tabs.kind == "shaw" else None  # (B, G, R, bq, 2K+1)
        for tile in tiling.key_tiles(qs, qe):
            k_t, v_t = tiling.key_slice(tiling.k5, tile), tiling.key_slice(tiling.v5, tile)
            s, idx = tiling.scores(q_t, k_t, qe_t, tile)
            p = torch.exp(s - lse_t[..., None])  # exact probabilities, from the saved lse
            dP = torch.matmul(dO_t, v_t.transpose(-1, -2))
            dS = p * (dP - D_t[..., None])  # gradient wrt the scaled logits
            j = tile.ks // o.block_k
            dv_j = torch.matmul(p.transpose(-1, -2), dO_t).sum(2, keepdim=True)
            dS_raw = dS * o.scale  # wrt the unscaled q·k (and q·e for Shaw); t5/alibi tables take dS itself
            dq_t = dq_t + torch.matmul(dS_raw, k_t)
            dk_j = torch.matmul(dS_raw.transpose(-1, -2), q_t).sum(2, keepdim=True)
            dk_parts[j] = _add(dk_parts[j], dk_j)
            dv_parts[j] = _add(dv_parts[j], dv_j)
            if tabs.kind == "shaw":
                g_rel = g_rel.scatter_add(-1, idx.expand(dS_raw.shape), dS_raw)
            elif tabs.kind and need_table:
                d_table = _add(d_table, tabs.bias_grad(dS, idx))
        if tabs.kind == "shaw":
            dq_t = dq_t + torch.matmul(g_rel, tabs.table5)
            if need_table:
                d_table = _add(d_table, tabs.shaw_grad(g_rel, q_t))
        dq_parts.append(dq_t)
    dq = torch.cat(dq_parts, dim=-2).reshape(q.shape)
    dk, dv = _join_key_parts(dk_parts, k, o), _join_key_parts(dv_parts, v, o)
    if d_table is not None:
        d_table = d_table.reshape(table.shape).to(table.dtype)
    elif need_table:
        d_table = torch.zeros_like(table)
    return dq, dk, dv, d_table


def _shaw_tangent(tabs: _Tables, ttabs: Optional[_Tables], q_t: Tensor, tq_t: Optional[Tensor]) -> Optional[Tensor]:
    """Shaw: the tangent of q_t Eᵀ, q̇ Eᵀ + q Ėᵀ (None for other kinds or no tangent)."""
    if tabs.kind != "shaw":
        return None
    dqe_t = None
    if tq_t is not None:
        dqe_t = torch.matmul(tq_t, tabs.table5.transpose(-1, -2))
    if ttabs is not None:
        dqe_t = _add(dqe_t, torch.matmul(q_t, ttabs.table5.transpose(-1, -2)))
    return dqe_t


def _score_tangent(tiling: _Tiling, ttabs, q_t, k_t, tq_t, tk5, dqe_t, idx, tile: Tile) -> Optional[Tensor]:
    """L̇ of one tile: c (q̇·k + q·k̇ [+ Shaw terms]) [+ Ṫ[h, bucket] or − ṡ_h |i − j|] (proofs §4)."""
    o, kind = tiling.o, tiling.tabs.kind
    ds = None  # tangent of the scaled logits
    if tq_t is not None:
        ds = torch.matmul(tq_t, k_t.transpose(-1, -2))
    if tk5 is not None:
        ds = _add(ds, torch.matmul(q_t, tiling.key_slice(tk5, tile).transpose(-1, -2)))
    if dqe_t is not None:
        ds = _add(ds, _gather_last(dqe_t, idx))
    if ds is not None:
        ds = ds * o.scale
    if ttabs is not None and kind in ("t5", "alibi"):
        t = ttabs.table5[..., idx] if kind == "t5" else -ttabs.table5 * idx.to(tiling.dtype)
        ds = t.to(tiling.dtype) if ds is None else ds + t
    return ds


def _blockwise_jvp(q, k, v, kpm, table, out, lse, tq, tk, tv, ttable, o: Opts):
    """Tangents (dO, dlse) of (O, lse): dS from the input tangents, then
    dlse = rowsum(P ∘ dS), dO = (P ∘ dS) V − dlse ∘ O + P dV, tile by tile with the saved lse."""
    B, H, Tq, _ = q.shape
    tiling = _Tiling(q, k, v, kpm, table, o)
    tabs = tiling.tabs
    tq5 = None if tq is None else tq.reshape(tiling.q5.shape)
    tk5 = None if tk is None else tk.reshape(tiling.k5.shape)
    tv5 = None if tv is None else tv.reshape(tiling.v5.shape)
    ttabs = _Tables(o, ttable, tiling.G, tiling.R) if (ttable is not None and tabs.kind) else None
    out5 = out.reshape(B, tiling.G, tiling.R, Tq, v.shape[-1])
    lse5 = lse.reshape(B, tiling.G, tiling.R, Tq)
    d_outs, d_lses = [], []
    for qs, qe in tiling.query_tiles():
        q_t, lse_t = tiling.q5[..., qs:qe, :], lse5[..., qs:qe]
        tq_t = None if tq5 is None else tq5[..., qs:qe, :]
        qe_t = tabs.project(q_t)
        dqe_t = _shaw_tangent(tabs, ttabs, q_t, tq_t)
        acc = torch.zeros_like(out5[..., qs:qe, :])
        c = torch.zeros_like(lse_t)
        for tile in tiling.key_tiles(qs, qe):
            k_t, v_t = tiling.key_slice(tiling.k5, tile), tiling.key_slice(tiling.v5, tile)
            s, idx = tiling.scores(q_t, k_t, qe_t, tile)
            p = torch.exp(s - lse_t[..., None])
            ds = _score_tangent(tiling, ttabs, q_t, k_t, tq_t, tk5, dqe_t, idx, tile)
            if ds is not None:
                pds = p * ds
                c = c + pds.sum(-1)
                acc = acc + torch.matmul(pds, v_t)
            if tv5 is not None:
                acc = acc + torch.matmul(p, tiling.key_slice(tv5, tile))
        d_outs.append(acc - c[..., None] * out5[..., qs:qe, :])
        d_lses.append(c)
    return torch.cat(d_outs, dim=-2).reshape(out.shape), torch.cat(d_lses, dim=-1).reshape(lse.shape)


class BlockwiseAttention(torch.autograd.Function):
    """Flash-style exact attention (functorch form). Inputs (q, k, v, key_padding_mask | None,
    table | None, opts: Opts); outputs (out, lse). Saves only inputs, out and lse: O(T) memory.

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
    """The blockwise backend alone (no dispatch, no argument checks); same semantics as
    :func:`aam_func.ops.attention.attention`."""
    rel = relative_bias
    low = q.dtype in (torch.float16, torch.bfloat16)
    opts = Opts(
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
# Registration: float64 samples that exercise tiling, GQA, padding, every variant.
# ----------------------------------------------------------------------------------------------


def _sample_bias(table, kind, kw) -> Optional[RelativeBias]:
    """The sample's relative bias (popping its sizes from ``kw``), or None."""
    if kind is None:
        return None
    return RelativeBias(kind, table, max_distance=kw.pop("max_distance", 3), num_buckets=kw.pop("num_buckets", 4))


def _op(q, k, v, table=None, *, kind=None, **kw):
    return blockwise(q, k, v, relative_bias=_sample_bias(table, kind, kw), block_q=3, block_k=3, **kw)


def _ref(q, k, v, table=None, *, kind=None, **kw):
    return reference(q, k, v, relative_bias=_sample_bias(table, kind, kw), **kw)


def _samples() -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
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
