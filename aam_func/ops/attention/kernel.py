"""Blockwise (flash-style) attention: exact, O(T) extra memory, forward- and reverse-mode AD.

:class:`BlockwiseAttention` tiles queries and keys and runs an online softmax; it saves only the
output and the row log-sum-exp, recomputes each tile's scores in the backward, has a ``jvp``
rule (forward-mode AD), a generated vmap rule, and exact double backward. Every mask and
relative bias of :mod:`.masks` is computed per tile from positions; key tiles outside the
causal/window band are skipped (local attention is O(T·w)). Its registered twin is the dense
:func:`aam_func.ops.attention.dense.reference`.

The tiling (which key tiles a query tile visits, heads split by group for GQA) and the one
tile-scores computation that forward, backward and jvp share live in :mod:`.tiles`.
Derivations: proofs/attention.md.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..registry import OpSpec, register
from .dense import reference, softmax_scale
from .block_mask import BlockMask, create_block_mask
from .masks import RelativeBias, Sparsity
from .mods import captured_tensors
from .tiles import Opts, RelativeTables, Tile, Tiling, accumulate, gather_last

__all__ = ["BlockwiseAttention", "blockwise"]


def _has_mods(o: Opts) -> bool:
    return o.score_mod is not None or o.mask_mod is not None


def _blockwise_forward(q, k, v, kpm, table, o: Opts, caps=()):
    """(out, lse) by the online softmax over key tiles (proofs/attention.md §2). With mods a row
    may have no allowed key: its output is 0 and its lse −∞ (FlexAttention's convention, §7)."""
    B, H, Tq, _ = q.shape
    tiling = Tiling(q, k, v, kpm, table, o, caps)
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
        if m is None:  # mask_mod allows no key to this whole query tile
            outs.append(q_t.new_zeros(q_t.shape[:-1] + v.shape[-1:]))
            lses.append(q_t.new_full(q_t.shape[:-1], float("-inf")))
            continue
        if _has_mods(o):  # rows with no allowed key: 0 / 1 instead of 0 / 0
            l = l.masked_fill(l == 0, 1.0)
        outs.append(acc / l[..., None])
        lses.append(m + torch.log(l) if not _has_mods(o) else torch.where(m == float("-inf"), m, m + torch.log(l)))
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


def _safe_lse(lse: Tensor, o: Opts) -> Tensor:
    """The saved lse with 0 for rows that allow no key (their logits are all −∞, so P = 0 there)."""
    return lse.masked_fill(lse == float("-inf"), 0.0) if _has_mods(o) else lse


def _tile_scores_vjp(tiling: Tiling, q_t, k_t, qe_t, tile: Tile):
    """(masked logits, relative index, vjp of score_mod or None) of one tile: the vjp maps the
    gradient wrt the modded logits to (gradient wrt the logits before score_mod, *captured)."""
    if tiling.score_mod is None:
        s, idx = tiling.scores(q_t, k_t, qe_t, tile)
        return s, idx, None
    s_pre, idx = tiling.logits(q_t, k_t, qe_t, tile)
    s_mod, vjp_fn = torch.func.vjp(tiling.mod_fn(tile), s_pre, *[tiling.caps[i] for i in tiling.grad_caps])
    return tiling.masked(s_mod, tile), idx, vjp_fn


def _blockwise_backward(q, k, v, kpm, table, out, lse, d_out, d_lse, o: Opts, need_table: bool, caps=()):
    """(dq, dk, dv, d_table, d_caps) from dS = P ∘ (dP − D), tile by tile with the saved lse
    (proofs §3); score_mod's vjp carries dS back through the mod to the logits and the
    captured tensors (§7)."""
    B, H, Tq, _ = q.shape
    tiling = Tiling(q, k, v, kpm, table, o, caps)
    tabs = tiling.tabs
    d_caps = [None] * len(caps)
    out5 = out.reshape(B, tiling.G, tiling.R, Tq, v.shape[-1])
    lse5 = _safe_lse(lse, o).reshape(B, tiling.G, tiling.R, Tq)
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
            s, idx, mod_vjp = _tile_scores_vjp(tiling, q_t, k_t, qe_t, tile)
            p = torch.exp(s - lse_t[..., None])  # exact probabilities, from the saved lse
            dP = torch.matmul(dO_t, v_t.transpose(-1, -2))
            dS = p * (dP - D_t[..., None])  # gradient wrt the scaled logits
            if mod_vjp is not None:  # back through score_mod: to its input logits and captured tensors
                dS, *dc = mod_vjp(dS)
                for i, g in zip(tiling.grad_caps, dc):
                    d_caps[i] = accumulate(d_caps[i], g)
            j = tile.ks // o.block_k
            dv_j = torch.matmul(p.transpose(-1, -2), dO_t).sum(2, keepdim=True)
            dS_raw = dS * o.scale  # wrt the unscaled q·k (and q·e for Shaw); t5/alibi tables take dS itself
            dq_t = dq_t + torch.matmul(dS_raw, k_t)
            dk_j = torch.matmul(dS_raw.transpose(-1, -2), q_t).sum(2, keepdim=True)
            dk_parts[j] = accumulate(dk_parts[j], dk_j)
            dv_parts[j] = accumulate(dv_parts[j], dv_j)
            if tabs.kind == "shaw":
                g_rel = g_rel.scatter_add(-1, idx.expand(dS_raw.shape), dS_raw)
            elif tabs.kind and need_table:
                d_table = accumulate(d_table, tabs.bias_grad(dS, idx))
        if tabs.kind == "shaw":
            dq_t = dq_t + torch.matmul(g_rel, tabs.table5)
            if need_table:
                d_table = accumulate(d_table, tabs.shaw_grad(g_rel, q_t))
        dq_parts.append(dq_t)
    dq = torch.cat(dq_parts, dim=-2).reshape(q.shape)
    dk, dv = _join_key_parts(dk_parts, k, o), _join_key_parts(dv_parts, v, o)
    if d_table is not None:
        d_table = d_table.reshape(table.shape).to(table.dtype)
    elif need_table:
        d_table = torch.zeros_like(table)
    for i in tiling.grad_caps:  # a captured tensor no visited tile read gets zeros
        if d_caps[i] is None:
            d_caps[i] = torch.zeros_like(caps[i])
    return dq, dk, dv, d_table, d_caps


def _shaw_tangent(tabs: RelativeTables, ttabs: Optional[RelativeTables], q_t: Tensor, tq_t: Optional[Tensor]) -> Optional[Tensor]:
    """Shaw: the tangent of q_t Eᵀ, q̇ Eᵀ + q Ėᵀ (None for other kinds or no tangent)."""
    if tabs.kind != "shaw":
        return None
    dqe_t = None
    if tq_t is not None:
        dqe_t = torch.matmul(tq_t, tabs.table5.transpose(-1, -2))
    if ttabs is not None:
        dqe_t = accumulate(dqe_t, torch.matmul(q_t, ttabs.table5.transpose(-1, -2)))
    return dqe_t


def _score_tangent(tiling: Tiling, ttabs, q_t, k_t, tq_t, tk5, dqe_t, idx, tile: Tile) -> Optional[Tensor]:
    """L̇ of one tile: c (q̇·k + q·k̇ [+ Shaw terms]) [+ Ṫ[h, bucket] or − ṡ_h |i − j|] (proofs §4)."""
    o, kind = tiling.o, tiling.tabs.kind
    ds = None  # tangent of the scaled logits
    if tq_t is not None:
        ds = torch.matmul(tq_t, k_t.transpose(-1, -2))
    if tk5 is not None:
        ds = accumulate(ds, torch.matmul(q_t, tiling.key_slice(tk5, tile).transpose(-1, -2)))
    if dqe_t is not None:
        ds = accumulate(ds, gather_last(dqe_t, idx))
    if ds is not None:
        ds = ds * o.scale
    if ttabs is not None and kind in ("t5", "alibi"):
        t = ttabs.table5[..., idx] if kind == "t5" else -ttabs.table5 * idx.to(tiling.dtype)
        ds = t.to(tiling.dtype) if ds is None else ds + t
    return ds


def _through_mod(tiling: Tiling, s_pre: Tensor, ds: Optional[Tensor], tcaps, tile: Tile) -> tuple[Tensor, Tensor]:
    """(masked logits, tangent) of one tile after score_mod: its jvp carries the tangent of the
    logits and of the captured tensors through the mod (proofs §7)."""
    fc = [tiling.caps[i] for i in tiling.grad_caps]
    tc = [torch.zeros_like(c) if tcaps is None or tcaps[i] is None else tcaps[i]
          for c, i in zip(fc, tiling.grad_caps)]
    # J·t as the vjp of the (linear) vjp: forward-mode AD cannot nest inside a jvp rule.
    s_mod, vjp_fn = torch.func.vjp(tiling.mod_fn(tile), s_pre, *fc)
    _, vjp_of_vjp = torch.func.vjp(vjp_fn, torch.zeros_like(s_mod))
    (ds,) = vjp_of_vjp((torch.zeros_like(s_pre) if ds is None else ds, *tc))
    return tiling.masked(s_mod, tile), ds


def _blockwise_jvp(q, k, v, kpm, table, out, lse, tq, tk, tv, ttable, o: Opts, caps=(), tcaps=None):
    """Tangents (dO, dlse) of (O, lse): dS from the input tangents, then
    dlse = rowsum(P ∘ dS), dO = (P ∘ dS) V − dlse ∘ O + P dV, tile by tile with the saved lse."""
    B, H, Tq, _ = q.shape
    tiling = Tiling(q, k, v, kpm, table, o, caps)
    lse = _safe_lse(lse, o)
    tabs = tiling.tabs
    tq5 = None if tq is None else tq.reshape(tiling.q5.shape)
    tk5 = None if tk is None else tk.reshape(tiling.k5.shape)
    tv5 = None if tv is None else tv.reshape(tiling.v5.shape)
    ttabs = RelativeTables(o, ttable, tiling.G, tiling.R) if (ttable is not None and tabs.kind) else None
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
            if tiling.score_mod is None:
                s, idx = tiling.scores(q_t, k_t, qe_t, tile)
                ds = _score_tangent(tiling, ttabs, q_t, k_t, tq_t, tk5, dqe_t, idx, tile)
            else:  # the tangent of the logits before score_mod, then through it
                s_pre, idx = tiling.logits(q_t, k_t, qe_t, tile)
                ds = _score_tangent(tiling, ttabs, q_t, k_t, tq_t, tk5, dqe_t, idx, tile)
                s, ds = _through_mod(tiling, s_pre, ds, tcaps, tile)
            p = torch.exp(s - lse_t[..., None])
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
    def forward(q, k, v, key_padding_mask, table, opts, *caps):
        return _blockwise_forward(q, k, v, key_padding_mask, table, opts, caps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kpm, table, opts, *caps = inputs
        out, lse = output
        ctx.opts, ctx.n_caps = opts, len(caps)
        ctx.save_for_backward(q, k, v, kpm, table, out, lse, *caps)
        ctx.save_for_forward(q, k, v, kpm, table, out, lse, *caps)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, kpm, table, out, lse, *caps = ctx.saved_tensors
        need_table = table is not None and ctx.needs_input_grad[4]
        if d_out is None and d_lse is None:
            return (None,) * (6 + ctx.n_caps)
        dq, dk, dv, dt, dc = _blockwise_backward(q, k, v, kpm, table, out, lse, d_out, d_lse, ctx.opts, need_table,
                                                 tuple(caps))
        return (dq, dk, dv, None, dt, None, *dc)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tkpm, ttable, _topts, *tcaps):
        q, k, v, kpm, table, out, lse, *caps = ctx.saved_tensors
        return _blockwise_jvp(q, k, v, kpm, table, out, lse, tq, tk, tv, ttable, ctx.opts, tuple(caps), tcaps)


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
    score_mod: Optional[Callable] = None,
    mask_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
) -> Tensor:
    """The blockwise backend alone (no dispatch, no argument checks); same semantics as
    :func:`aam_func.ops.attention.attention`. With a ``block_mask`` its tile sizes are the
    kernel's and its mask_mod is the mask; a ``mask_mod`` alone gets a block mask built here."""
    rel = relative_bias
    low = q.dtype in (torch.float16, torch.bfloat16)
    if mask_mod is not None and block_mask is None:
        block_mask = create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device,
                                       (block_q, block_k))
    if block_mask is not None:
        mask_mod, (block_q, block_k) = block_mask.mask_mod, block_mask.block_size
    captured = tuple(captured_tensors(score_mod, mask_mod))
    opts = Opts(
        causal=bool(causal),
        window=window,
        sparsity=sparsity,
        rel_kind=None if rel is None else rel.kind,
        max_distance=128 if rel is None else rel.max_distance,
        num_buckets=32 if rel is None else rel.num_buckets,
        bidirectional=True if rel is None else rel.bidirectional,
        scale=float(softmax_scale(q.shape[-1], scale)),
        block_q=block_q,
        block_k=block_k,
        score_mod=score_mod,
        mask_mod=mask_mod,
        plan=None if block_mask is None else block_mask.plan,
        captured=captured,
    )
    table = None if rel is None else rel.table
    # The kernel chooses its own precision: under autocast its matmuls would silently drop to
    # bf16/fp16 in the forward while the backward (run outside autocast) mixes dtypes.
    with torch.autocast(q.device.type, enabled=False):
        if low:  # accumulate in float32, return in the input dtype
            q32, k32, v32 = q.float(), k.float(), v.float()
            t32 = None if table is None else table.float()
            return BlockwiseAttention.apply(q32, k32, v32, key_padding_mask, t32, opts, *captured)[0].to(q.dtype)
        if table is not None:
            table = table.to(q.dtype)
        return BlockwiseAttention.apply(q, k, v, key_padding_mask, table, opts, *captured)[0]


# ----------------------------------------------------------------------------------------------
# Registration: float64 samples that exercise tiling, GQA, padding, every variant.
# ----------------------------------------------------------------------------------------------


def _sample_bias(table, kind, kw) -> Optional[RelativeBias]:
    """The sample's relative bias (popping its sizes from ``kw``), or None."""
    if kind is None:
        return None
    return RelativeBias(kind, table, max_distance=kw.pop("max_distance", 3), num_buckets=kw.pop("num_buckets", 4))


_SAMPLE_DOCS = torch.tensor([[0, 0, 0, 1, 1, 2]])


def _sample_mods(table, kind, kw) -> dict:
    """A sample's score_mod / mask_mod (issue 20): a learned per-head table the closure captures
    (it gets gradients), soft-capping, and a document mask."""
    from . import mods

    if kind == "mods":
        return dict(score_mod=mods.compose_scores(mods.relative_table(table, 2), mods.softcap(2.0)),
                    mask_mod=mods.and_masks(mods.causal_mask, mods.document(_SAMPLE_DOCS)))
    return {}


def _op(q, k, v, table=None, *, kind=None, **kw):
    if kind == "mods":
        return blockwise(q, k, v, block_q=3, block_k=2, **_sample_mods(table, kind, kw), **kw)
    return blockwise(q, k, v, relative_bias=_sample_bias(table, kind, kw), block_q=3, block_k=3, **kw)


def _ref(q, k, v, table=None, *, kind=None, **kw):
    if kind == "mods":
        return reference(q, k, v, **_sample_mods(table, kind, kw), **kw)
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
        ((r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d), r(H, 5)), dict(kind="mods")),
    ]


register(OpSpec(name="attention", function=BlockwiseAttention, op=_op, reference=_ref, proof="proofs/attention.md",
                samples=_samples, supports_forward_ad=True, supports_double_backward=True))
