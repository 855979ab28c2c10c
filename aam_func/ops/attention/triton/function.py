"""The Triton attention op as a ``torch.autograd.Function`` (functorch form), and the host-side
preparation of its inputs.

:class:`TritonAttention` takes (q, k, v, kpm, qe, rb, layout, tiles, cfg, scale) and returns
(out, lse). The relative biases reach the kernels in two position-indexed forms, built here in
differentiable torch ops so their own derivatives flow by autograd and forward AD:

- Shaw: ``qe = q Eᵀ`` (B, H, Tq, 2K+1); the kernel adds ``qe[i, clip(j − i, −K, K) + K]``
  before the scale;
- T5 and ALiBi: ``rb`` (1, H, Tk + Tq − 1), the per-head bias of each offset ``j − i``
  (``table[h, bucket(j − i)]``, or ``−slope_h |j − i|``), added after the scale.

Backward runs the two backward kernels; a backward that must itself be differentiated (double
backward, ``grad`` of ``grad``, ``jvp`` of ``grad``) runs the dense twin under ``torch.func.vjp``
instead, exact and O(T²) in memory like every double-backward graph of this op. ``jvp`` runs the
fused forward+tangent kernel. vmap comes from ``generate_vmap_rule``: the custom ops of
:mod:`.launch` carry the vmap rules that fold the vmapped dimension into the grid.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._util import _levels, higher_order_active
from ..dense import expand_kv, softmax_scale
from ..masks import RelativeBias, Sparsity, allowed_mask, t5_bucket
from . import launch

__all__ = ["TritonAttention", "TritonAttentionCore", "prepare", "dense_twin"]

_SPARSE = {None: 0, "strided": 1, "fixed": 2, "block": 3}


def _blocks(q: Tensor, k: Tensor, block_m: Optional[int], block_n: Optional[int]) -> tuple[int, int]:
    """Tile sizes: given, or on CUDA 64 x 64 for fp16/bf16 and 32 x 32 for fp32/fp64 (IEEE
    matmuls without tensor cores: 64-tiles took 2 minutes to compile the fp32 jvp kernel for
    sm_90 ahead of time, 32-tiles 21 s), untuned since no GPU has run these kernels yet; 16 x 16
    under the interpreter. Powers of two, at least 16 on CUDA (tl.dot's minimum)."""
    cuda = q.device.type == "cuda"
    tile = (64 if q.dtype in (torch.float16, torch.bfloat16) else 32) if cuda else 16
    bm = block_m or tile
    bn = block_n or tile
    for name, b in (("block_q", bm), ("block_k", bn)):
        if b & (b - 1) or (cuda and b < 16):
            raise ValueError(f"backend='triton' needs {name} a power of two{' >= 16 on CUDA' if cuda else ''}, got {b}")
    return bm, bn


def _tile_table(Tq: int, Tk: int, off: int, bm: int, bn: int, causal, window, sparsity, device) -> Tensor:
    """(NQT, NKT) uint8: whether a sparse pattern (with the causal/window band) leaves any pair
    of the (query tile, key tile) allowed; the kernels skip the others (proofs, Claim 3)."""
    nqt, nkt = -(-Tq // bm), -(-Tk // bn)
    k_pos = torch.arange(Tk, device=device)
    out = torch.empty(nqt, nkt, dtype=torch.uint8, device=device)
    step = max(1, (1 << 22) // max(1, bm * Tk))  # query tiles per chunk: bounded memory
    for t0 in range(0, nqt, step):
        t1 = min(nqt, t0 + step)
        q_pos = torch.arange(off + t0 * bm, off + min(Tq, t1 * bm), device=device)
        ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)
        ok = torch.nn.functional.pad(ok, (0, nkt * bn - Tk, 0, (t1 - t0) * bm - ok.shape[0]))
        out[t0:t1] = ok.reshape(t1 - t0, bm, nkt, bn).any(3).any(1).to(torch.uint8)
    return out


def _relative_inputs(q: Tensor, rel: Optional[RelativeBias], Tq: int, Tk: int, off: int, acc_dtype):
    """(qe, rb, K): the Shaw term q Eᵀ, or the per-offset bias vector, in differentiable ops."""
    if rel is None:
        return None, None, 0
    if rel.kind == "shaw":
        qe = torch.matmul(q.to(acc_dtype), rel.table.to(acc_dtype).transpose(-1, -2))  # (B, H, Tq, 2K+1)
        return qe, None, rel.max_distance
    offsets = torch.arange(Tk + Tq - 1, device=q.device) - (off + Tq - 1)  # every j - i, ascending
    if rel.kind == "t5":
        bucket = t5_bucket(offsets, bidirectional=rel.bidirectional, num_buckets=rel.num_buckets,
                           max_distance=rel.max_distance)
        rb = rel.table.to(acc_dtype)[:, bucket]
    else:  # alibi
        rb = -rel.table.to(acc_dtype)[:, None] * offsets.abs().to(acc_dtype)
    return None, rb[None], 0


def prepare(q, k, v, *, causal, key_padding_mask, window, sparsity: Optional[Sparsity], relative_bias, scale,
            q_offset, block_m, block_n):
    """The Function's inputs for one call (q, k, v already in one dtype)."""
    Tq, Tk = q.shape[2], k.shape[2]
    off = Tk - Tq if q_offset is None else int(q_offset)
    bm, bn = _blocks(q, k, block_m, block_n)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qe, rb, kmax = _relative_inputs(q, relative_bias, Tq, Tk, off, acc_dtype)
    kpm = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.uint8)
    layout = tiles = None
    sp_a = sp_b = 0
    if sparsity is not None:
        sp_a = sparsity.block_size if sparsity.pattern == "block" else sparsity.stride
        sp_b = sparsity.summary if sparsity.pattern == "fixed" else 0
        if sparsity.pattern == "block":
            layout = sparsity.layout.to(device=q.device, dtype=torch.uint8).contiguous()
        tiles = _tile_table(Tq, Tk, off, bm, bn, causal, window, sparsity, q.device)
    cfg = (int(bool(causal)), int(window or 0), _SPARSE[None if sparsity is None else sparsity.pattern], sp_a, sp_b,
           off, kmax, bm, bn)
    return q, k, v, kpm, qe, rb, layout, tiles, cfg, float(softmax_scale(q.shape[-1], scale))


def dense_twin(q, k, v, kpm, qe, rb, layout, cfg, scale):
    """(out, lse) of the same inputs by dense torch ops: the double-backward path."""
    causal, window, sparse, sp_a, sp_b, off, kmax, _, _ = cfg
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx, vx = expand_kv(k, H).to(acc), expand_kv(v, H).to(acc)
    i = torch.arange(Tq, device=q.device) + off
    j = torch.arange(Tk, device=q.device)
    s = torch.matmul(q.to(acc), kx.transpose(-1, -2))
    if qe is not None:
        idx = ((j[None, :] - i[:, None]).clamp(-kmax, kmax) + kmax).expand(B, H, Tq, Tk)
        s = s + torch.gather(qe, -1, idx)
    s = s * scale
    if rb is not None:
        s = s + rb[..., (j[None, :] - i[:, None]) + off + Tq - 1]
    sparsity = None
    if sparse:
        pattern = {1: "strided", 2: "fixed", 3: "block"}[sparse]
        sparsity = Sparsity(pattern, stride=sp_a if sparse < 3 else 0, summary=max(sp_b, 1), block_size=sp_a,
                            layout=None if layout is None else layout.bool())
    ok = allowed_mask(i, j, causal=bool(causal), window=window or None, sparsity=sparsity)
    if kpm is not None:
        ok = ok & (kpm.bool()[:, None, None, :] | (i[:, None] == j[None, :]))
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.exp(s - lse[..., None]), vx)
    return out.to(q.dtype), lse


def _differentiated_backward() -> bool:
    """True when the backward itself will be differentiated: create_graph outside torch.func,
    or a second grad level, or forward AD over the backward."""
    return (torch.is_grad_enabled() and _levels("Grad") == 0) or higher_order_active()


class TritonAttentionCore(torch.autograd.Function):
    """Triton flash attention (functorch form) without a jvp rule: what runs under
    ``torch.compile``, since dynamo cannot trace a Function that defines ``jvp`` (it would
    break the graph at every attention call). Outputs (out, lse); saves inputs, out and lse."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, kpm, qe, rb, layout, tiles, cfg, scale):
        return launch.fwd(q, k, v, kpm, qe, rb, layout, tiles, list(cfg), scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kpm, qe, rb, layout, tiles, cfg, scale = inputs
        out, lse = output
        ctx.cfg, ctx.scale = cfg, scale
        ctx.save_for_backward(q, k, v, kpm, qe, rb, layout, tiles, out, lse)
        ctx.save_for_forward(q, k, v, kpm, qe, rb, layout, tiles)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, kpm, qe, rb, layout, tiles, out, lse = ctx.saved_tensors
        none = (None,) * 10
        if d_out is None and d_lse is None:
            return none
        if not torch.compiler.is_compiling() and _differentiated_backward():
            return _dense_backward(ctx, q, k, v, kpm, qe, rb, layout, d_out, d_lse)
        d_out = torch.zeros_like(out) if d_out is None else d_out
        delta = (d_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse
        with torch.no_grad():  # under torch.func.grad the kernels' custom op must not be traced
            dq, dk, dv, dqe, drb = launch.bwd(q, k, v, kpm, qe, rb, layout, tiles, lse, d_out, delta,
                                              list(ctx.cfg), ctx.scale)
        dqe = dqe.to(qe.dtype) if qe is not None else None
        if rb is not None:
            drb = (drb.sum(0, keepdim=True) if rb.shape[0] == 1 else drb).to(rb.dtype)
        else:
            drb = None
        return dq, dk, dv, None, dqe, drb, None, None, None, None


class TritonAttention(TritonAttentionCore):
    """:class:`TritonAttentionCore` with the fused forward-mode kernel as its ``jvp`` rule."""

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tkpm, tqe, trb, _tlayout, _ttiles, _tcfg, _tscale):
        q, k, v, kpm, qe, rb, layout, tiles = ctx.saved_tensors
        _, _, t_out, t_lse = launch.jvp(q, k, v, kpm, qe, rb, layout, tiles, tq, tk, tv, tqe, trb,
                                        list(ctx.cfg), ctx.scale)
        return t_out, t_lse


def _dense_backward(ctx, q, k, v, kpm, qe, rb, layout, d_out, d_lse):
    """The vjp of :func:`dense_twin`, differentiable: for a backward that is differentiated."""
    names = [n for n, t in (("q", q), ("k", k), ("v", v), ("qe", qe), ("rb", rb)) if t is not None]
    given = {"q": q, "k": k, "v": v, "qe": qe, "rb": rb}

    def f(*xs):
        kw = dict(given, **dict(zip(names, xs)))
        return dense_twin(kw["q"], kw["k"], kw["v"], kpm, kw["qe"], kw["rb"], layout, ctx.cfg, ctx.scale)

    outs, vjp_fn = torch.func.vjp(f, *[given[n] for n in names])
    cots = (torch.zeros_like(outs[0]) if d_out is None else d_out,
            torch.zeros_like(outs[1]) if d_lse is None else d_lse)
    grads = dict(zip(names, vjp_fn(cots)))
    return (grads["q"], grads["k"], grads["v"], None, grads.get("qe"), grads.get("rb"), None, None, None, None)
