"""The tiles of the blockwise kernel: which key tiles a query tile visits, and a tile's scores.

Heads are split as (groups G = kv_heads, reps R = heads // kv_heads) so a query tile
(B, G, R, bq, d) broadcasts against a key tile (B, G, 1, bk, d) without copying k or v for
grouped-query attention. :func:`key_tiles` skips tiles outside the causal/window band from
integer arithmetic alone (proofs/attention.md, Claim 3); :meth:`Tiling.scores` is the one
computation of a tile's masked logits that the kernel's forward, backward and jvp share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .masks import Sparsity, allowed_mask, t5_bucket
from .mods import rebind

__all__ = ["Opts", "Tile", "key_tiles", "RelativeTables", "Tiling", "accumulate", "gather_last"]


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
    score_mod: Optional[Callable] = None  # (score, b, h, q_idx, kv_idx) -> score, see .mods
    mask_mod: Optional[Callable] = None  # (b, h, q_idx, kv_idx) -> bool
    plan: Optional[tuple] = None  # BlockMask.plan: per query tile, the (key tile, full) pairs to visit
    captured: tuple = ()  # the tensors the mods capture; the kernel's extra inputs, in this order


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
    mod_mask: bool = False  # the block mask marks the tile partial: mask_mod decides per pair


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
    planned = None if o.plan is None else dict(o.plan[qs // o.block_q])
    # with a block mask, only its tiles (the others: mask_mod allows no pair of them)
    starts = range(0, Tk, o.block_k) if planned is None else [j * o.block_k for j in planned]
    for ks in starts:
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
        if planned is None:
            yield Tile(qs, qe, ks, ke, ok, diag)
        else:
            yield Tile(qs, qe, ks, ke, ok, diag, not planned[ks // o.block_k])


def accumulate(total: Optional[Tensor], part: Tensor) -> Tensor:
    """``total + part``, or ``part`` when nothing is accumulated yet."""
    return part if total is None else total + part


def gather_last(x: Tensor, idx: Tensor) -> Tensor:
    """x (..., bq, n), idx (bq, bk) -> (..., bq, bk) with out[..., a, b] = x[..., a, idx[a, b]]."""
    return torch.gather(x, -1, idx.expand(x.shape[:-1] + idx.shape[-1:]))


class RelativeTables:
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


class Tiling:
    """One call's q, k, v split by head group, and the per-tile pieces forward, backward and jvp share."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], table: Optional[Tensor], o: Opts,
                 caps: tuple = ()):
        B, H, Tq, d = q.shape
        self.G = k.shape[1]
        self.R = H // self.G
        self.q5 = q.reshape(B, self.G, self.R, Tq, d)
        self.k5 = k.reshape(B, self.G, 1, k.shape[2], d)
        self.v5 = v.reshape(B, self.G, 1, v.shape[2], v.shape[-1])
        self.o, self.kpm, self.Tq, self.Tk = o, kpm, Tq, k.shape[2]
        self.dtype, self.device = q.dtype, q.device
        self.tabs = RelativeTables(o, table, self.G, self.R)
        self.caps = tuple(caps)  # the kernel's copies of the tensors the mods capture
        self.mask_mod = rebind(o.mask_mod, list(o.captured), list(caps))
        self.score_mod = rebind(o.score_mod, list(o.captured), list(caps))
        self.grad_caps = [i for i, c in enumerate(self.caps) if c.is_floating_point()]  # score_mod's differentiable inputs

    def query_tiles(self) -> Iterator[tuple[int, int]]:
        for qs in range(0, self.Tq, self.o.block_q):
            yield qs, min(qs + self.o.block_q, self.Tq)

    def key_tiles(self, qs: int, qe: int) -> Iterator[Tile]:
        return key_tiles(self.o, self.Tq, self.Tk, qs, qe, self.kpm is not None, self.device)

    def key_slice(self, x5: Tensor, t: Tile) -> Tensor:
        """The tile's keys (or values, or their tangents): x5[..., ks:ke, :]."""
        return x5[..., t.ks:t.ke, :]

    def index(self, t: Tile) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The mods' (b, h, q_idx, kv_idx) for a tile, broadcastable to (B, G, R, bq, bk); h is the
        query head g·R + r and q_idx the raw query index (FlexAttention's)."""
        dev = self.device
        B = self.q5.shape[0]
        return (torch.arange(B, device=dev).view(B, 1, 1, 1, 1),
                torch.arange(self.G * self.R, device=dev).view(1, self.G, self.R, 1, 1),
                torch.arange(t.qs, t.qe, device=dev).view(1, 1, 1, -1, 1),
                torch.arange(t.ks, t.ke, device=dev).view(1, 1, 1, 1, -1))

    def mod_fn(self, t: Tile) -> Callable:
        """score_mod on one tile as a function of (scores, *floating captured tensors), for
        torch.func.vjp / jvp: the captured tensors are its inputs, so they get gradients."""
        idx = self.index(t)
        caps, o = list(self.caps), self.o

        def f(s, *fcaps):
            cs = list(caps)
            for i, c in zip(self.grad_caps, fcaps):
                cs[i] = c
            return rebind(o.score_mod, list(o.captured), cs)(s, *idx).expand(s.shape)

        return f

    def logits(self, q_t: Tensor, k_t: Tensor, qe_t: Optional[Tensor], t: Tile) -> tuple[Tensor, Optional[Tensor]]:
        """The tile's scaled logits with the relative term, before score_mod and masks, and the
        relative index (or None):

            S_ij = c (q_i·k_j + q_i·E[idx_ij])  (Shaw),  c q_i·k_j + T[h, idx_ij]  (T5),
                   c q_i·k_j − s_h idx_ij  (ALiBi),  c q_i·k_j  (none).
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
            s = (s + gather_last(qe_t, idx)) * o.scale
        else:
            s = s * o.scale
            if tabs.kind == "t5":
                s = s + tabs.table5[..., idx].to(self.dtype)
            elif tabs.kind == "alibi":
                s = s - tabs.table5.to(self.dtype) * idx.to(self.dtype)
        return s, idx

    def masked(self, s: Tensor, t: Tile) -> Tensor:
        """``s`` with −∞ where the tile's pair is not allowed (positions, key padding, mask_mod)."""
        ok = t.static_ok
        if self.kpm is not None:
            kp = self.kpm[:, None, None, None, t.ks:t.ke]  # (B, 1, 1, 1, bk)
            if t.diag is not None:
                kp = kp | t.diag
            ok = kp if ok is None else (kp & ok)
        if t.mod_mask:
            mm = self.mask_mod(*self.index(t))
            ok = mm if ok is None else (ok & mm)
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
        return s

    def scores(self, q_t: Tensor, k_t: Tensor, qe_t: Optional[Tensor], t: Tile) -> tuple[Tensor, Optional[Tensor]]:
        """The tile's logits after score_mod, −∞ where not allowed (B, G, R, bq, bk), and the
        relative index (or None): :meth:`logits`, score_mod, :meth:`masked`."""
        s, idx = self.logits(q_t, k_t, qe_t, t)
        if self.score_mod is not None:
            s = self.score_mod(s, *self.index(t)).expand(s.shape)
        return self.masked(s, t), idx
