"""Launching the Triton kernels, wrapped as torch custom ops (``torch.ops.aam_func.triton_attn_*``)
with fake (meta) implementations for ``torch.compile`` and vmap rules that fold the vmapped
dimension into the kernels' batch grid (so ``vmap`` costs one launch, not a loop).

The kernels are loaded twice at most, on first use: compiled for CUDA tensors, and under
Triton's interpreter for CPU tensors (``TRITON_INTERPRET`` is set only while the kernel module
is executed, through triton's knob scope, so the two coexist and nothing global changes).

``cfg`` (a list of ints, the static part of a call): causal, window (0: none), sparse kind
(0 none, 1 strided, 2 fixed, 3 block), sparse a (stride or block size), sparse b (summary),
query offset, Shaw K (0: none), block_m, block_n. See :mod:`.kernels` for the tensor layouts.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["load_kernels", "fwd", "jvp", "bwd", "CFG_FIELDS"]

CFG_FIELDS = ("causal", "window", "sparse", "sp_a", "sp_b", "off", "kmax", "block_m", "block_n")
_LOADED: dict = {}


def load_kernels(interpret: bool):
    """The kernel module, executed with Triton's interpreter switched on or off."""
    if interpret not in _LOADED:
        import triton

        path = pathlib.Path(__file__).with_name("kernels.py")
        name = f"{__package__}._kernels_{'interpret' if interpret else 'cuda'}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            spec.loader.exec_module(mod)
        if interpret:
            _quiet_interpreter()
        _LOADED[interpret] = mod
    return _LOADED[interpret]


def _quiet_interpreter() -> None:
    """The interpreter checks every 32-bit integer op for overflow (a debug aid a compiled
    kernel runs only with debug=True); here it tripled the run time of these index-heavy
    kernels. Switch it off on triton's interpreter builder, which only interpreted kernels use."""
    import dataclasses

    from triton.runtime import interpreter

    b = interpreter.interpreter_builder
    if getattr(b, "options", None) is not None and getattr(b.options, "sanitize_overflow", False):
        b.options = dataclasses.replace(b.options, sanitize_overflow=False)


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (int(n) - 1).bit_length()))


class _Call:
    """The shared launch arguments of one call: sizes, flags, dtypes, placeholders."""

    def __init__(self, q, k, v, kpm, qe, rb, layout, tiles, cfg: List[int], scale: float):
        causal, window, sparse, sp_a, sp_b, off, kmax, bm, bn = cfg
        B, H, Tq, D = q.shape
        HKV, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
        cuda = q.device.type == "cuda"
        self.kern = load_kernels(not cuda)
        self.grid_q = (triton_cdiv(Tq, bm), B * H)
        self.grid_k = (triton_cdiv(Tk, bn), B * HKV)
        self.acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dummy = q
        LR = rb.shape[-1] if rb is not None else 1
        self.tensors = dict(KPM=kpm if kpm is not None else dummy, QE=qe if qe is not None else dummy,
                            RB=rb if rb is not None else dummy, LAYOUT=layout if layout is not None else dummy,
                            TILES=tiles if tiles is not None else dummy)
        nkt = triton_cdiv(Tk, bn)
        self.ints = dict(H=H, HKV=HKV, Tq=Tq, Tk=Tk, D=D, OFF=off, WINDOW=max(window, 1), SP_A=max(sp_a, 1),
                         SP_B=sp_b, NQB=layout.shape[0] if layout is not None else 1,
                         NKB=layout.shape[1] if layout is not None else 1, NKT=nkt, KMAX=kmax,
                         NREL=2 * kmax + 1, RB_OFF=off + Tq - 1, LR=LR,
                         RB_SB=(H * LR if rb is not None and rb.shape[0] > 1 else 0), SCALE=float(scale))
        self.DV = DV
        import triton.language as tl

        low = q.dtype in (torch.bfloat16, torch.float16)
        self.consts = dict(CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=kpm is not None, SPARSE=sparse,
                           HAS_QE=qe is not None, HAS_RB=rb is not None,
                           ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                           PREC="tf32" if (low or (cuda and torch.backends.cuda.matmul.allow_tf32)) else "ieee",
                           UPCAST=(not cuda) and low, BM=bm, BN=bn, BD=_pow2(D, 16 if cuda else 1),
                           BDV=_pow2(DV, 16 if cuda else 1))
        self.launch = dict(num_warps=4 if max(D, DV) <= 64 else 8, num_stages=2) if cuda else {}


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _contig(*ts):
    return [None if t is None else t.contiguous() for t in ts]


@torch.library.custom_op("aam_func::triton_attn_fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qe: Optional[Tensor], rb: Optional[Tensor],
        layout: Optional[Tensor], tiles: Optional[Tensor], cfg: List[int], scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention with every mask and bias given."""
    q, k, v, kpm, qe, rb = _contig(q, k, v, kpm, qe, rb)
    c = _Call(q, k, v, kpm, qe, rb, layout, tiles, cfg, scale)
    B, H, Tq, _ = q.shape
    out = torch.empty(B, H, Tq, c.DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=c.acc_dtype, device=q.device)
    c.kern._fwd_kernel[c.grid_q](q, k, v, out, lse, **c.tensors, **c.ints, DV=c.DV, **c.consts, **c.launch)
    return out, lse


@fwd.register_fake
def _(q, k, v, kpm, qe, rb, layout, tiles, cfg, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.custom_op("aam_func::triton_attn_jvp", mutates_args=())
def jvp(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qe: Optional[Tensor], rb: Optional[Tensor],
        layout: Optional[Tensor], tiles: Optional[Tensor], tq: Optional[Tensor], tk: Optional[Tensor],
        tv: Optional[Tensor], tqe: Optional[Tensor], trb: Optional[Tensor], cfg: List[int],
        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, t_out, t_lse) in one fused pass; a tangent given as None is zero."""
    q, k, v, kpm, qe, rb, tq, tk, tv, tqe, trb = _contig(q, k, v, kpm, qe, rb, tq, tk, tv, tqe, trb)
    c = _Call(q, k, v, kpm, qe, rb, layout, tiles, cfg, scale)
    B, H, Tq, _ = q.shape
    out = torch.empty(B, H, Tq, c.DV, dtype=q.dtype, device=q.device)
    t_out = torch.empty_like(out)
    lse = torch.empty(B, H, Tq, dtype=c.acc_dtype, device=q.device)
    t_lse = torch.empty_like(lse)
    tqe_ok = tqe is not None and qe is not None
    trb_ok = trb is not None and rb is not None
    c.kern._jvp_kernel[c.grid_q](
        q, k, v, out, lse, t_out, t_lse, tq if tq is not None else q, tk if tk is not None else k,
        tv if tv is not None else v, **c.tensors, TQE=tqe if tqe_ok else q, TRB=trb if trb_ok else q, **c.ints,
        DV=c.DV, TRB_SB=(c.ints["H"] * c.ints["LR"] if trb_ok and trb.shape[0] > 1 else 0), **c.consts,
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, HAS_TQE=tqe_ok, HAS_TRB=trb_ok,
        **c.launch)
    return out, lse, t_out, t_lse


@jvp.register_fake
def _(q, k, v, kpm, qe, rb, layout, tiles, tq, tk, tv, tqe, trb, cfg, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=acc)
    return out, lse, torch.empty_like(out), torch.empty_like(lse)


@torch.library.custom_op("aam_func::triton_attn_bwd", mutates_args=())
def bwd(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qe: Optional[Tensor], rb: Optional[Tensor],
        layout: Optional[Tensor], tiles: Optional[Tensor], lse: Tensor, d_out: Tensor, delta: Tensor,
        cfg: List[int], scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dqe, drb) given dO and Δ = rowsum(dO ∘ O) − dlse; dqe / drb are empty
    when qe / rb are None, and drb is per batch row (B, H, LR): the caller sums a shared one."""
    q, k, v, kpm, qe, rb, lse, d_out, delta = _contig(q, k, v, kpm, qe, rb, lse, d_out, delta)
    c = _Call(q, k, v, kpm, qe, rb, layout, tiles, cfg, scale)
    B, H, Tq, _ = q.shape
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.empty_like(q)
    acc = c.acc_dtype
    dqe = torch.zeros(qe.shape, dtype=acc, device=q.device) if qe is not None else q.new_zeros(0)
    drb = torch.zeros(B, H, rb.shape[-1], dtype=acc, device=q.device) if rb is not None else q.new_zeros(0)
    common = dict(**c.tensors, **c.ints, DV_=c.DV, **c.consts, **c.launch)
    c.kern._bwd_kv_kernel[c.grid_k](q, k, v, d_out, lse, delta, dk, dv, **common)
    c.kern._bwd_q_kernel[c.grid_q](q, k, v, d_out, lse, delta, dq, dqe if qe is not None else q,
                                   drb if rb is not None else q, **common)
    return dq, dk, dv, dqe, drb


@bwd.register_fake
def _(q, k, v, kpm, qe, rb, layout, tiles, lse, d_out, delta, cfg, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dqe = q.new_empty(qe.shape, dtype=acc) if qe is not None else q.new_empty(0)
    drb = q.new_empty(q.shape[0], q.shape[1], rb.shape[-1], dtype=acc) if rb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dqe, drb


# ----------------------------------------------------------------------------------------------
# vmap: fold the vmapped dimension N into the batch B (one launch over N·B rows of the grid).
# ----------------------------------------------------------------------------------------------

_N_TENSORS = {"fwd": 8, "jvp": 13, "bwd": 11}
_UNFOLDED = (6, 7)  # layout, tiles: static, never batched


def _fold_args(info, in_dims, args, n_tensors: int):
    """Args with every batch-carrying tensor as (N·B, ...); B is q's batch."""
    N = info.batch_size
    q, q_dim = args[0], in_dims[0]
    B = q.shape[0] if q_dim is None else q.movedim(q_dim, 0).shape[1]
    out = list(args)
    for idx in range(n_tensors):
        a, d = args[idx], in_dims[idx]
        if a is None:
            continue
        if idx in _UNFOLDED:
            if d is not None:
                raise NotImplementedError("triton attention: the sparse layout cannot be vmapped")
            continue
        a = a.unsqueeze(0).expand(N, *a.shape) if d is None else a.movedim(d, 0)
        if a.dim() >= 2 and a.shape[1] == 1 and B > 1 and idx in _SHARED_BATCH:
            a = a.expand(N, B, *a.shape[2:])  # a bias vector shared over the batch
        out[idx] = a.reshape(N * a.shape[1], *a.shape[2:])
    return out, N


_SHARED_BATCH = (5, 12)  # rb (fwd/jvp/bwd index 5) and trb (jvp index 12) may have batch 1


def _unfold(outs, N: int):
    return tuple(o.reshape(N, o.shape[0] // N, *o.shape[1:]) if o.numel() else o for o in outs), tuple(
        0 if o.numel() else None for o in outs)


@fwd.register_vmap
def _(info, in_dims, *args):
    folded, N = _fold_args(info, in_dims, args, _N_TENSORS["fwd"])
    return _unfold(fwd(*folded), N)


@jvp.register_vmap
def _(info, in_dims, *args):
    folded, N = _fold_args(info, in_dims, args, _N_TENSORS["jvp"])
    return _unfold(jvp(*folded), N)


@bwd.register_vmap
def _(info, in_dims, *args):
    folded, N = _fold_args(info, in_dims, args, _N_TENSORS["bwd"])
    return _unfold(bwd(*folded), N)
