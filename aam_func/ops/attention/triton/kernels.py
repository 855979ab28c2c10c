"""The Triton kernels of the attention op: forward, fused forward+jvp, and the two backward
kernels (dk/dv by key tile, dq by query tile). Loaded by :mod:`.launch` through
``load_kernels(interpret)``, once compiled for CUDA and once under Triton's interpreter for the
CPU, so this module is executed, not imported (its ``@triton.jit`` decorators read the
interpreter switch at load time).

Layout (all contiguous): q (B, H, Tq, D), k (B, HKV, Tk, D), v (B, HKV, Tk, DV), out
(B, H, Tq, DV), lse (B, H, Tq) in the accumulation dtype; kpm (B, Tk) uint8; qe (B, H, Tq,
2K+1) the Shaw term q·E; rb (1 or B, H, LR) the per-head bias indexed by j − i + RB_OFF (T5
and ALiBi); layout (NQB, NKB) uint8 block-sparse layout; tiles (NQT, NKT) uint8, which
(query tile, key tile) pairs a sparse pattern leaves non-empty. Positions: query row r sits at
OFF + r, key column j at j (proofs/attention.md, "Triton kernels").
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter multiplies bf16 operands as their raw uint16 bits; run it in fp32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


# Row reductions through tl.reduce with local combine functions: tl.max / tl.sum are jit
# functions of triton's own library, fixed as compiled or interpreted when triton is imported,
# so they would not run inside this module's interpreted copy.
@triton.jit
def _rowmax(x):
    return tl.reduce(x, 1, _max2)


@triton.jit
def _rowsum(x):
    return tl.reduce(x, 1, _add2)


@triton.jit
def _allowed(i, j, b, kpm_ptr, layout_ptr, Tk, WINDOW, SP_A, SP_B, NQB, NKB,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SPARSE: tl.constexpr):
    """(BM, BN) bool: query positions i (BM, 1) may read keys j (1, BN); masks.allowed_mask's rule."""
    ok = (j < Tk) & (i >= 0)
    if CAUSAL:
        ok = ok & (j <= i)
    if HAS_WINDOW:
        if CAUSAL:
            ok = ok & (i - j < WINDOW)
        else:
            ok = ok & (i - j < WINDOW) & (j - i < WINDOW)
    if SPARSE == 1:  # strided
        ok = ok & ((((i - j) < SP_A) & ((j - i) < SP_A)) | ((i - j) % SP_A == 0) | (i == j))
    elif SPARSE == 2:  # fixed
        ok = ok & (((i // SP_A) == (j // SP_A)) | ((j % SP_A) >= SP_A - SP_B) | (i == j))
    elif SPARSE == 3:  # block layout
        qb = tl.minimum(i // SP_A, NQB - 1)
        kb = tl.minimum(j // SP_A, NKB - 1)
        lay = tl.load(layout_ptr + qb * NKB + kb, mask=(j < Tk) & (i >= 0), other=0)
        ok = ok & ((lay != 0) | (i == j))
    if HAS_KPM:
        kp = tl.load(kpm_ptr + b * Tk + j, mask=j < Tk, other=0)
        ok = ok & ((kp != 0) | (i == j))
    return ok


@triton.jit
def _bias(s, i, j, rows, row_ok, qe_ptr, rb_ptr, Tk, SCALE, KMAX, NREL, RB_OFF,
          HAS_QE: tl.constexpr, HAS_RB: tl.constexpr):
    """Scaled logits from raw q·k (BM, BN): c (q·k + qe[i, clip(j − i) + K]) + rb[j − i + RB_OFF]."""
    valid = row_ok & (j < Tk)
    if HAS_QE:
        idx = tl.minimum(tl.maximum(j - i, -KMAX), KMAX) + KMAX
        s += tl.load(qe_ptr + rows * NREL + idx, mask=valid, other=0.0).to(s.dtype)
    s = s * SCALE
    if HAS_RB:
        s += tl.load(rb_ptr + (j - i + RB_OFF), mask=valid, other=0.0).to(s.dtype)
    return s


@triton.jit
def _key_range(i_lo, i_hi, Tk, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BN: tl.constexpr):
    """[lo, hi): the key columns a query tile at positions [i_lo, i_hi] may read (lo tile-aligned)."""
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(hi, i_hi + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, i_lo - WINDOW + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, i_hi + WINDOW)
    lo = (lo // BN) * BN
    return lo, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, QE, RB, LAYOUT, TILES,
                H, HKV, Tq, Tk, D, DV, OFF, WINDOW, SP_A, SP_B, NQB, NKB, NKT, KMAX, NREL, RB_OFF, LR, RB_SB, SCALE,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SPARSE: tl.constexpr,
                HAS_QE: tl.constexpr, HAS_RB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // HKV)
    rows = m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    dq = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    row_ok = rows[:, None] < Tq
    i = OFF + rows[:, None]
    q = tl.load(Q + (bh * Tq + rows[:, None]) * D + dq[None, :], mask=row_ok & (dq[None, :] < D), other=0.0)
    kbase = (b * HKV + g) * Tk
    qe_ptr = QE + bh * Tq * NREL
    rb_ptr = RB + b * RB_SB + h * LR
    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.full((BM,), 0.0, ACC)
    acc = tl.full((BM, BDV), 0.0, ACC)
    lo, hi = _key_range(OFF + m * BM, OFF + tl.minimum(m * BM + BM, Tq) - 1, Tk, WINDOW, CAUSAL, HAS_WINDOW, BN)
    for start in range(lo, hi, BN):
        visit = True
        if SPARSE != 0:
            visit = tl.load(TILES + m * NKT + start // BN) != 0
        if visit:
            j = start + cols[None, :]
            kcol = start + cols[:, None]
            k = tl.load(K + (kbase + kcol) * D + dq[None, :], mask=(kcol < Tk) & (dq[None, :] < D), other=0.0)
            v = tl.load(V + (kbase + kcol) * DV + dv[None, :], mask=(kcol < Tk) & (dv[None, :] < DV), other=0.0)
            s = _dot(q, tl.trans(k), ACC, PREC, UPCAST)
            s = _bias(s, i, j, rows[:, None], row_ok, qe_ptr, rb_ptr, Tk, SCALE, KMAX, NREL, RB_OFF, HAS_QE, HAS_RB)
            ok = _allowed(i, j, b, KPM, LAYOUT, Tk, WINDOW, SP_A, SP_B, NQB, NKB, CAUSAL, HAS_WINDOW, HAS_KPM, SPARSE)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, _rowmax(s))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + _rowsum(p)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, PREC, UPCAST)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + (bh * Tq + rows[:, None]) * DV + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok & (dv[None, :] < DV))
    tl.store(LSE + bh * Tq + rows, m_i + tl.log(l_i), mask=rows < Tq)


@triton.jit
def _jvp_kernel(Q, K, V, O, LSE, TO, TLSE, TQ, TK, TV, KPM, QE, RB, TQE, TRB, LAYOUT, TILES,
                H, HKV, Tq, Tk, D, DV, OFF, WINDOW, SP_A, SP_B, NQB, NKB, NKT, KMAX, NREL, RB_OFF, LR, RB_SB,
                TRB_SB, SCALE,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SPARSE: tl.constexpr,
                HAS_QE: tl.constexpr, HAS_RB: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr,
                HAS_TV: tl.constexpr, HAS_TQE: tl.constexpr, HAS_TRB: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                BDV: tl.constexpr):
    """Primal and tangent in one pass: the online softmax carries (m, l, Σ p v) and the tangent
    accumulators c = Σ p ṡ and Σ p (ṡ v + v̇), all rescaled by the same alpha."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // HKV)
    rows = m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    dq = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    row_ok = rows[:, None] < Tq
    i = OFF + rows[:, None]
    qmask = row_ok & (dq[None, :] < D)
    q = tl.load(Q + (bh * Tq + rows[:, None]) * D + dq[None, :], mask=qmask, other=0.0)
    if HAS_TQ:
        tq = tl.load(TQ + (bh * Tq + rows[:, None]) * D + dq[None, :], mask=qmask, other=0.0)
    kbase = (b * HKV + g) * Tk
    qe_ptr = QE + bh * Tq * NREL
    rb_ptr = RB + b * RB_SB + h * LR
    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.full((BM,), 0.0, ACC)
    acc = tl.full((BM, BDV), 0.0, ACC)
    c_i = tl.full((BM,), 0.0, ACC)
    acc_t = tl.full((BM, BDV), 0.0, ACC)
    lo, hi = _key_range(OFF + m * BM, OFF + tl.minimum(m * BM + BM, Tq) - 1, Tk, WINDOW, CAUSAL, HAS_WINDOW, BN)
    for start in range(lo, hi, BN):
        visit = True
        if SPARSE != 0:
            visit = tl.load(TILES + m * NKT + start // BN) != 0
        if visit:
            j = start + cols[None, :]
            kcol = start + cols[:, None]
            kmask = (kcol < Tk) & (dq[None, :] < D)
            vmask = (kcol < Tk) & (dv[None, :] < DV)
            k = tl.load(K + (kbase + kcol) * D + dq[None, :], mask=kmask, other=0.0)
            v = tl.load(V + (kbase + kcol) * DV + dv[None, :], mask=vmask, other=0.0)
            s = _dot(q, tl.trans(k), ACC, PREC, UPCAST)
            s = _bias(s, i, j, rows[:, None], row_ok, qe_ptr, rb_ptr, Tk, SCALE, KMAX, NREL, RB_OFF, HAS_QE, HAS_RB)
            ok = _allowed(i, j, b, KPM, LAYOUT, Tk, WINDOW, SP_A, SP_B, NQB, NKB, CAUSAL, HAS_WINDOW, HAS_KPM, SPARSE)
            s = tl.where(ok, s, float("-inf"))
            # ṡ = c (q̇ kᵀ + q k̇ᵀ + q̇e[idx]) + ṙb[j − i]: the tangent of the scaled logits
            ds = tl.full((BM, BN), 0.0, ACC)
            if HAS_TQ:
                ds += _dot(tq, tl.trans(k), ACC, PREC, UPCAST)
            if HAS_TK:
                tk = tl.load(TK + (kbase + kcol) * D + dq[None, :], mask=kmask, other=0.0)
                ds += _dot(q, tl.trans(tk), ACC, PREC, UPCAST)
            ds = _bias(ds, i, j, rows[:, None], row_ok, TQE + bh * Tq * NREL, TRB + b * TRB_SB + h * LR, Tk, SCALE,
                       KMAX, NREL, RB_OFF, HAS_TQE, HAS_TRB)
            ds = tl.where(ok, ds, 0.0)
            m_new = tl.maximum(m_i, _rowmax(s))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            pds = p * ds
            l_i = l_i * alpha + _rowsum(p)
            c_i = c_i * alpha + _rowsum(pds)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, PREC, UPCAST)
            acc_t = acc_t * alpha[:, None] + _dot(pds.to(v.dtype), v, ACC, PREC, UPCAST)
            if HAS_TV:
                tv = tl.load(TV + (kbase + kcol) * DV + dv[None, :], mask=vmask, other=0.0)
                acc_t += _dot(p.to(tv.dtype), tv, ACC, PREC, UPCAST)
            m_i = m_new
    out = acc / l_i[:, None]
    t_lse = c_i / l_i
    t_out = acc_t / l_i[:, None] - t_lse[:, None] * out
    omask = row_ok & (dv[None, :] < DV)
    optr = (bh * Tq + rows[:, None]) * DV + dv[None, :]
    tl.store(O + optr, out.to(O.dtype.element_ty), mask=omask)
    tl.store(TO + optr, t_out.to(TO.dtype.element_ty), mask=omask)
    tl.store(LSE + bh * Tq + rows, m_i + tl.log(l_i), mask=rows < Tq)
    tl.store(TLSE + bh * Tq + rows, t_lse, mask=rows < Tq)


@triton.jit
def _query_range(j_lo, j_hi, OFF, Tq, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BM: tl.constexpr):
    """[lo, hi): the query rows that may read a key tile at columns [j_lo, j_hi] (lo tile-aligned)."""
    lo = 0
    hi = Tq
    if CAUSAL:
        lo = tl.maximum(lo, j_lo - OFF)
    if HAS_WINDOW:
        hi = tl.minimum(hi, j_hi + WINDOW - OFF)
        if not CAUSAL:
            lo = tl.maximum(lo, j_lo - WINDOW + 1 - OFF)
    lo = (lo // BM) * BM
    return lo, hi


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, LSE, DL, DK, DV, KPM, QE, RB, LAYOUT, TILES,
                   H, HKV, Tq, Tk, D, DV_, OFF, WINDOW, SP_A, SP_B, NQB, NKB, NKT, KMAX, NREL, RB_OFF, LR, RB_SB,
                   SCALE,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SPARSE: tl.constexpr,
                   HAS_QE: tl.constexpr, HAS_RB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """dK, dV of one key tile of one kv head: summed over the R query heads it serves (GQA) and
    over the query tiles that read it; P is exact from the saved lse, dS = P ∘ (dP − Δ)."""
    n = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    R = H // HKV
    cols = n * BN + tl.arange(0, BN)
    dq = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    j = cols[None, :]
    kcol = cols[:, None]
    kmask = (kcol < Tk) & (dq[None, :] < D)
    vmask = (kcol < Tk) & (dv[None, :] < DV_)
    k = tl.load(K + (bg * Tk + kcol) * D + dq[None, :], mask=kmask, other=0.0)
    v = tl.load(V + (bg * Tk + kcol) * DV_ + dv[None, :], mask=vmask, other=0.0)
    dk = tl.full((BN, BD), 0.0, ACC)
    dvacc = tl.full((BN, BDV), 0.0, ACC)
    lo, hi = _query_range(n * BN, tl.minimum(n * BN + BN, Tk) - 1, OFF, Tq, WINDOW, CAUSAL, HAS_WINDOW, BM)
    for r in range(0, R):
        h = g * R + r
        bh = b * H + h
        for start in range(lo, hi, BM):
            visit = True
            if SPARSE != 0:
                visit = tl.load(TILES + (start // BM) * NKT + n) != 0
            if visit:
                rows = start + tl.arange(0, BM)
                row_ok = rows[:, None] < Tq
                i = OFF + rows[:, None]
                q = tl.load(Q + (bh * Tq + rows[:, None]) * D + dq[None, :], mask=row_ok & (dq[None, :] < D), other=0.0)
                do = tl.load(DO + (bh * Tq + rows[:, None]) * DV_ + dv[None, :], mask=row_ok & (dv[None, :] < DV_),
                             other=0.0)
                lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
                dl = tl.load(DL + bh * Tq + rows, mask=rows < Tq, other=0.0)
                s = _dot(q, tl.trans(k), ACC, PREC, UPCAST)
                s = _bias(s, i, j, rows[:, None], row_ok, QE + bh * Tq * NREL, RB + b * RB_SB + h * LR, Tk, SCALE,
                          KMAX, NREL, RB_OFF, HAS_QE, HAS_RB)
                ok = _allowed(i, j, b, KPM, LAYOUT, Tk, WINDOW, SP_A, SP_B, NQB, NKB, CAUSAL, HAS_WINDOW, HAS_KPM,
                              SPARSE) & row_ok
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dvacc += _dot(tl.trans(p).to(do.dtype), do, ACC, PREC, UPCAST)
                dp = _dot(do, tl.trans(v), ACC, PREC, UPCAST)
                ds = p * (dp - dl[:, None]) * SCALE
                dk += _dot(tl.trans(ds).to(q.dtype), q, ACC, PREC, UPCAST)
    tl.store(DK + (bg * Tk + kcol) * D + dq[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + (bg * Tk + kcol) * DV_ + dv[None, :], dvacc.to(DV.dtype.element_ty), mask=vmask)


@triton.jit
def _bwd_q_kernel(Q, K, V, DO, LSE, DL, DQ, DQE, DRB, KPM, QE, RB, LAYOUT, TILES,
                  H, HKV, Tq, Tk, D, DV_, OFF, WINDOW, SP_A, SP_B, NQB, NKB, NKT, KMAX, NREL, RB_OFF, LR, RB_SB,
                  SCALE,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SPARSE: tl.constexpr,
                  HAS_QE: tl.constexpr, HAS_RB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """dQ of one query tile, and its rows' share of the Shaw term's and the bias vector's
    gradients (dqe = c dS scattered by clipped offset, drb = dS scattered by j − i: atomics,
    since several (i, j) of a tile share one offset)."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // HKV)
    rows = m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    dq = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    row_ok = rows[:, None] < Tq
    i = OFF + rows[:, None]
    qmask = row_ok & (dq[None, :] < D)
    q = tl.load(Q + (bh * Tq + rows[:, None]) * D + dq[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + (bh * Tq + rows[:, None]) * DV_ + dv[None, :], mask=row_ok & (dv[None, :] < DV_), other=0.0)
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
    dl = tl.load(DL + bh * Tq + rows, mask=rows < Tq, other=0.0)
    kbase = (b * HKV + g) * Tk
    dqacc = tl.full((BM, BD), 0.0, ACC)
    lo, hi = _key_range(OFF + m * BM, OFF + tl.minimum(m * BM + BM, Tq) - 1, Tk, WINDOW, CAUSAL, HAS_WINDOW, BN)
    for start in range(lo, hi, BN):
        visit = True
        if SPARSE != 0:
            visit = tl.load(TILES + m * NKT + start // BN) != 0
        if visit:
            j = start + cols[None, :]
            kcol = start + cols[:, None]
            k = tl.load(K + (kbase + kcol) * D + dq[None, :], mask=(kcol < Tk) & (dq[None, :] < D), other=0.0)
            v = tl.load(V + (kbase + kcol) * DV_ + dv[None, :], mask=(kcol < Tk) & (dv[None, :] < DV_), other=0.0)
            s = _dot(q, tl.trans(k), ACC, PREC, UPCAST)
            s = _bias(s, i, j, rows[:, None], row_ok, QE + bh * Tq * NREL, RB + b * RB_SB + h * LR, Tk, SCALE,
                      KMAX, NREL, RB_OFF, HAS_QE, HAS_RB)
            ok = _allowed(i, j, b, KPM, LAYOUT, Tk, WINDOW, SP_A, SP_B, NQB, NKB, CAUSAL, HAS_WINDOW, HAS_KPM,
                          SPARSE) & row_ok
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), ACC, PREC, UPCAST)
            ds = p * (dp - dl[:, None])
            dqacc += _dot((ds * SCALE).to(k.dtype), k, ACC, PREC, UPCAST)
            if HAS_QE:
                idx = tl.minimum(tl.maximum(j - i, -KMAX), KMAX) + KMAX
                tl.atomic_add(DQE + (bh * Tq + rows[:, None]) * NREL + idx, ds * SCALE, mask=ok)
            if HAS_RB:
                tl.atomic_add(DRB + bh * LR + (j - i + RB_OFF), ds, mask=ok)
    tl.store(DQ + (bh * Tq + rows[:, None]) * D + dq[None, :], dqacc.to(DQ.dtype.element_ty), mask=qmask)
