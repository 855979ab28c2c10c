"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the hidden matrices, with an
AdamW fallback for everything else (embeddings, the LM head, biases and norm gains).

Reference: K. Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024,
github.com/KellerJordan/Muon), and ``torch.optim.Muon``, which this module follows (defaults,
the bf16 iteration, the learning-rate adjustment). Formulas: ``proofs/optim_modern.md``.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import Tensor

from .. import tree
from ..checks import check_choice, check_int, is_number
from . import foreach
from .aliases import adamw
from .base import GradientTransformation, aligned, build, check_beta, check_nonneg, entry, leaves_of
from .transforms import lr_at

__all__ = ["orthogonalize", "scale_by_muon", "muon", "muon_rule", "MUON_ADAM_GLOBS"]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Jordan's) quintic coefficients
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
# matrices that Muon leaves to AdamW by default (Jordan: embeddings and the head are not hidden layers)
MUON_ADAM_GLOBS = ("*embed*", "*wte*", "*wpe*", "*head*", "*pos*")


def orthogonalize(g: Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = torch.bfloat16) -> Tensor:
    """``≈ U Vᵀ`` of ``g = U S Vᵀ`` by ``steps`` quintic Newton–Schulz iterations (Jordan 2024):

    ``X_0 = G / max(‖G‖_F, eps)`` (transposed when ``G`` has more rows than columns), then
    ``A = X Xᵀ;  X ← a X + (b A + c A²) X``. With the default coefficients the singular values
    land in about [0.7, 1.2] rather than exactly 1 (they maximise the slope at 0). Runs in
    ``dtype`` (``torch.optim.Muon``: bfloat16; ``None``: ``g``'s dtype, e.g. float64 for
    gradchecks) and returns that dtype. Out of place, differentiable.
    """
    if g.dim() != 2:
        raise ValueError(f"orthogonalize needs a 2-d matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g if dtype is None else g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / torch.clamp(torch.linalg.vector_norm(x), min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_ratio(shape, adjust_lr_fn) -> float:
    """torch.optim.Muon's per-matrix scale: ``sqrt(max(1, rows / cols))`` ("original", the
    default), ``0.2 sqrt(max(rows, cols))`` ("match_rms_adamw": the update's RMS is AdamW's)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _check_muon(momentum, ns_steps, coefficients, eps, adjust_lr_fn) -> None:
    check_beta("momentum", momentum)
    check_int("ns_steps", ns_steps, min=1, max=99)
    if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3):
        raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {coefficients!r}")
    check_nonneg("eps", eps)
    check_choice("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)


def _matrix_leaves(names, gs) -> None:
    bad = [f"{n!r} {tuple(g.shape)}" for n, g in zip(names, gs) if g.dim() != 2]
    if bad:
        raise ValueError("Muon's Newton–Schulz step needs 2-d matrices, but its mask selects "
                         f"{', '.join(bad)}; leave those to the Adam fallback (muon's mask=, default muon_rule)")


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS,
                  ns_steps: int = 5, eps: float = 1e-7, adjust_lr_fn: str | None = None,
                  ns_dtype: torch.dtype | None = torch.bfloat16) -> GradientTransformation:
    """Muon's direction (``torch.optim.Muon``), for 2-d leaves only:

    ``b = momentum b + (1 - momentum) g`` (lerp);  ``m = lerp(g, b, momentum)`` with ``nesterov``
    else ``b``;  ``u = ratio(shape) · orthogonalize(m)`` (:func:`orthogonalize`, :func:`_lr_ratio`).

    Optax's ``contrib.muon`` uses the plain sum ``b = momentum b + g``; we follow torch (EMA).
    A leaf that is not a matrix is a ValueError naming it. State ``{"mu": tree}``.
    """
    _check_muon(momentum, ns_steps, ns_coefficients, eps, adjust_lr_fn)

    def init(params):
        names, ps = leaves_of(params, "params")
        _matrix_leaves(names, ps)
        return {"mu": build(names, foreach.zeros_like(ps))}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        _matrix_leaves(names, gs)
        bufs = aligned(names, entry(state, "mu", "muon state"), "muon state 'mu'", like=gs, same_dtype=True)
        bufs = foreach.lerp(bufs, gs, 1 - momentum)
        ms = [torch.lerp(g, b, momentum) for g, b in zip(gs, bufs)] if nesterov else bufs
        us = []
        for m, g in zip(ms, gs):
            o = orthogonalize(m, ns_coefficients, ns_steps, eps, ns_dtype).to(g.dtype)
            ratio = _lr_ratio(g.shape, adjust_lr_fn)
            us.append(o if ratio == 1.0 else o * ratio)  # x * 1.0 is x: skip the pass
        return build(names, us), {"mu": build(names, bufs)}

    return GradientTransformation(init, update)


def muon_rule(name: str, leaf) -> bool:
    """Which leaves Muon takes by default: 2-d matrices whose name matches none of
    :data:`MUON_ADAM_GLOBS` (embeddings, positions, the head go to AdamW, as Jordan's recipe)."""
    return leaf.dim() == 2 and not any(fnmatch.fnmatchcase(name, p) for p in MUON_ADAM_GLOBS)


def _muon_part(learning_rate, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
               adjust_lr_fn, ns_dtype) -> GradientTransformation:
    """``u = -lr (wd p + scale_by_muon(g))`` (torch: ``p *= 1 - lr wd; p -= lr ratio O``)."""
    direction = scale_by_muon(momentum, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn, ns_dtype)

    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64), "muon": direction.init(params)}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        count = entry(state, "count", "muon state")
        lr = lr_at(learning_rate, count)
        os_, inner = direction.update(grads, entry(state, "muon", "muon state"))
        os_ = aligned(names, os_, "muon direction", like=gs)
        # the direction's buffers are fresh (its own output): scale and decay them in place
        us = foreach.mul_(os_, -lr) if foreach.can_write(os_, [foreach.as_scalar(lr)]) else foreach.mul(os_, -lr)
        if not (is_number(weight_decay) and weight_decay == 0):
            ps = aligned(names, params, "params", like=gs)
            us = foreach.add_(us, ps, alpha=-lr * weight_decay)
        return build(names, us), {"count": count + 1, "muon": inner}

    return GradientTransformation(init, update)


def muon(learning_rate=1e-3, momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.1,
         ns_coefficients=NS_COEFFICIENTS, ns_steps: int = 5, eps: float = 1e-7, adjust_lr_fn: str | None = None,
         ns_dtype: torch.dtype | None = torch.bfloat16, mask=None, adam_learning_rate=3e-4, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
         adam_mask=None) -> GradientTransformation:
    """Muon on the selected matrices, AdamW on the rest.

    Muon leaves (``torch.optim.Muon``, defaults its own): ``u = -lr (wd p + ratio · NS(m))``.
    ``mask`` picks them: globs on dotted names, a predicate ``(name, leaf)`` or a bool tree
    (default :func:`muon_rule`: 2-d, not embeddings/positions/head); a selected leaf that is not
    2-d is a ValueError naming it (at ``init``). The other leaves get
    ``adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay, mask=adam_mask)``.
    Both learning rates may be schedules. State ``{"muon": ..., "adam": ...}``.
    """
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_nonneg("weight_decay", weight_decay)
    check_nonneg("adam_learning_rate", adam_learning_rate, allow_schedule=True)
    _check_muon(momentum, ns_steps, ns_coefficients, eps, adjust_lr_fn)
    select = tree.selector(muon_rule if mask is None else mask)
    muon_t = _muon_part(learning_rate, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
                        adjust_lr_fn, ns_dtype)
    adam_t = adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay, mask=adam_mask)
    from .wrappers import partition

    def labels(name, leaf):
        return "muon" if select(name, leaf) else "adam"

    return partition({"muon": muon_t, "adam": adam_t}, labels)

