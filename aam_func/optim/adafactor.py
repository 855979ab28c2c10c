"""Adafactor: factored second moments, a relative step size and update clipping.

Reference: N. Shazeer, M. Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost*, ICML 2018 (Algorithms 4 and 5), as ``torch.optim.Adafactor`` implements it; this module
follows torch where torch and Optax differ (listed in :func:`adafactor`). Formulas:
``proofs/optim_modern.md``.
"""

from __future__ import annotations

import torch

from ..checks import check_number, is_number
from . import foreach
from .base import GradientTransformation, aligned, build, check_nonneg, entry, leaves_of, step_counter
from .aliases import _decay_flags
from .transforms import lr_at

__all__ = ["adafactor"]


def _init(params):
    """Per leaf: ``row`` (..., R, 1) and ``col`` (..., 1, C) for a matrix (or a stack of them),
    ``v`` (shape of the leaf) for a vector or scalar; the other entries are 0-element tensors
    (a safetensors-friendly stand-in for "none")."""
    names, ps = leaves_of(params, "params")
    rows, cols, vs = [], [], []
    empty = lambda p: p.new_zeros((0,))  # noqa: E731
    for p in ps:
        if p.dim() > 1:
            rows.append(p.new_zeros((*p.shape[:-1], 1)))
            cols.append(p.new_zeros((*p.shape[:-2], 1, p.shape[-1])))
            vs.append(empty(p))
        else:
            rows.append(empty(p))
            cols.append(empty(p))
            vs.append(torch.zeros_like(p))
    return {"count": step_counter(), "row": build(names, rows), "col": build(names, cols), "v": build(names, vs)}


def _second_moment(g, row, col, v, beta2_t, eps1, own: bool):
    """``(v̂, row, col, v)``: the factored (matrix) or full (vector) estimate of ``E[g²]``. With
    ``own`` the matrix estimate is divided in place (its buffer is this call's); same values."""
    if g.dim() > 1:
        sq = g.square()  # one square for both means
        row = torch.lerp(row, sq.mean(dim=-1, keepdim=True), beta2_t)
        col = torch.lerp(col, sq.mean(dim=-2, keepdim=True), beta2_t)
        est = row @ col
        den = torch.clamp(row.mean(dim=-2, keepdim=True), min=eps1)
        return (est.div_(den) if own else est / den), row, col, v
    v = torch.lerp(v, g * g, beta2_t)
    return v, row, col, v


def adafactor(learning_rate=1e-2, beta2_decay: float = -0.8, eps1: float | None = None, eps2: float = 1e-3,
              d: float = 1.0, weight_decay: float = 0.0, mask=None) -> GradientTransformation:
    """``torch.optim.Adafactor`` (Shazeer & Stern 2018, Alg. 4/5 without momentum), per leaf at step ``t``:

    ``β̂₂ₜ = 1 - t^beta2_decay``;  ``ρₜ = min(lr, 1/√t)`` (relative step);  ``αₜ = max(eps2, RMS(p)) ρₜ``;
    matrices (last two dims): ``R = lerp(R, mean_cols(g²), 1-β̂₂ₜ)``, ``C = lerp(C, mean_rows(g²), 1-β̂₂ₜ)``,
    ``v̂ = R C / max(mean(R), eps1)``; vectors: ``v̂ = lerp(v̂, g², 1-β̂₂ₜ)``;
    ``U = g / sqrt(max(v̂, eps1²))``;  ``u = -lr wd p - αₜ U / max(1, RMS(U) / d)`` (update clipping).

    ``eps1`` None: the leaf dtype's machine epsilon (torch). Differences from Optax's
    ``adafactor``: no momentum, every ≥2-d leaf is factored (Optax: only dims ≥ 128), ``ρₜ``
    capped by ``lr`` rather than multiplied, decoupled weight decay ``lr·wd``. State
    ``{"count", "row", "col", "v"}`` (0-element placeholders where a leaf has no such factor).
    ``mask`` (an extension; torch decays every leaf): which leaves decay, as :func:`adamw`'s.
    Differentiable: no ``.item()``; the maxima are ``torch.clamp``.
    """
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_number("beta2_decay", beta2_decay, max=0)
    check_number("eps1", eps1, min=0, allow_none=True)
    check_nonneg("eps2", eps2)
    check_number("d", d, min=1)
    check_nonneg("weight_decay", weight_decay)
    has_decay = not (is_number(weight_decay) and weight_decay == 0)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        rows = aligned(names, entry(state, "row", "adafactor state"), "adafactor state 'row'")
        cols = aligned(names, entry(state, "col", "adafactor state"), "adafactor state 'col'")
        vs = aligned(names, entry(state, "v", "adafactor state"), "adafactor state 'v'")
        count = entry(state, "count", "adafactor state")
        lr = foreach.as_scalar(lr_at(learning_rate, count))
        count = count + 1
        t = count.to(foreach.SCALAR_DTYPE)
        beta2_t = torch.pow(t, beta2_decay)  # 1 - β̂₂ₜ, the lerp weight
        rho = torch.minimum(lr, torch.rsqrt(t))
        flags = _decay_flags(mask, names, ps) if has_decay else [False] * len(names)
        # own: eager, outside transforms and autograd: the chain U = rsqrt(max(v̂, eps1²)) g, then
        # the clipping scale, run in place on the one buffer each leaf allocates (same values)
        own = foreach.can_write(gs, ps, [lr])
        us, new_r, new_c, new_v = [], [], [], []
        for g, p, r, c, v, decays in zip(gs, ps, rows, cols, vs, flags):
            e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
            est, r, c, v = _second_moment(g, r, c, v, beta2_t.to(g.dtype), e1, own)
            rms_p = torch.linalg.vector_norm(p) / (p.numel() ** 0.5)
            alpha = torch.clamp(rms_p, min=eps2) * rho
            if own:  # est is this call's buffer for matrices; a vector's is the new state v: copy it
                step = (torch.clamp(est, min=e1 * e1) if g.dim() <= 1 else est.clamp_(min=e1 * e1)).rsqrt_().mul_(g)
            else:
                step = torch.rsqrt(torch.clamp(est, min=e1 * e1)) * g
            clip = torch.clamp(torch.linalg.vector_norm(step) / ((step.numel() ** 0.5) * d), min=1.0)
            scale = (-alpha / clip).to(g.dtype)
            u = step.mul_(scale) if own else step * scale
            if decays:
                u = u - (lr * weight_decay).to(g.dtype) * p
            us.append(u)
            new_r.append(r)
            new_c.append(c)
            new_v.append(v)
        return build(names, us), {"count": count, "row": build(names, new_r), "col": build(names, new_c),
                                  "v": build(names, new_v)}

    return GradientTransformation(_init, update)

