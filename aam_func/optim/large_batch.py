"""Layer-wise trust ratios for large batches: LARS and LAMB, as Optax composes them.

References: Y. You, I. Gitman, B. Ginsburg, *Large Batch Training of Convolutional Networks*
(LARS, 2017, eq. 6-7); Y. You et al., *Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes* (LAMB, ICLR 2020, Algorithm 2); Optax's ``lars``, ``lamb`` and
``scale_by_trust_ratio``, which these follow (there is no torch.optim reference). Formulas:
``proofs/optim_modern.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import is_number
from . import foreach
from .aliases import _decay_flags
from .base import GradientTransformation, aligned, build, chain, check_beta, check_nonneg, leaves_of, substate
from .transforms import add_decayed_weights, learning_rate_scale_, scale_by_adam, scale_by_learning_rate, trace

__all__ = ["scale_by_trust_ratio", "lamb", "lars"]


def scale_by_trust_ratio(min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0) -> GradientTransformation:
    """Per leaf: ``u = g · r`` with ``r = trust_coefficient · ‖p‖ / (‖g‖ + eps)``, where
    ``‖p‖ = max(‖p‖₂, min_norm)``, ``‖g‖ = max(‖g‖₂, min_norm)``, and ``r = 1`` when either norm
    is 0 (Optax). Needs ``params``; no state."""
    check_nonneg("min_norm", min_norm)
    check_nonneg("trust_coefficient", trust_coefficient)
    check_nonneg("eps", eps)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        return build(names, foreach.mul(gs, trust_ratios(gs, ps, min_norm, trust_coefficient, eps))), state

    return GradientTransformation(lambda params: {}, update)


def _ratio(pn: Tensor, gn: Tensor, min_norm, trust_coefficient, eps) -> Tensor:
    """:func:`scale_by_trust_ratio`'s ``r`` from the norms (0-d tensors, or one vector of them)."""
    pn = torch.clamp(pn, min=min_norm)
    gn = torch.clamp(gn, min=min_norm)
    ok = (pn > 0) & (gn > 0)
    ratio = trust_coefficient * pn / torch.where(ok, gn + eps, torch.ones_like(gn))
    return torch.where(ok, ratio, torch.ones_like(ratio))


def trust_ratios(gs, ps, min_norm=0.0, trust_coefficient=1.0, eps=0.0) -> list[Tensor]:
    """The per-leaf ratios ``r`` of :func:`scale_by_trust_ratio`, each a 0-d tensor in its
    gradient's dtype. The norms come from one ``_foreach_norm`` each; when they share a dtype
    the ratio arithmetic runs once on the stacked norms (elementwise, so the same bits as leaf by
    leaf) instead of a handful of 0-d ops per leaf."""
    pns, gns = foreach.norms(ps), foreach.norms(gs)
    if pns and len({n.dtype for n in pns + gns}) == 1:
        rs = list(_ratio(torch.stack(pns), torch.stack(gns), min_norm, trust_coefficient, eps).unbind())
    else:
        rs = [_ratio(pn, gn, min_norm, trust_coefficient, eps) for pn, gn in zip(pns, gns)]
    return [r.to(g.dtype) for r, g in zip(rs, gs)]


def _mul_owned(ds: list, own: list, fs) -> list:
    """``d * f`` per leaf (``fs`` a list of factors or one scalar): in place on the buffers this
    update owns, into fresh ones elsewhere."""
    out = list(ds)
    for fresh in (True, False):
        idx = [i for i in range(len(ds)) if own[i] == fresh]
        if idx:
            mul = foreach.mul_ if fresh else foreach.mul
            for i, d in zip(idx, mul([ds[i] for i in idx], [fs[i] for i in idx] if isinstance(fs, list) else fs)):
                out[i] = d
    return out


def _with_trust_ratio(pre, weight_decay, mask, trust_coefficient, eps, post, learning_rate) -> GradientTransformation:
    """``chain(*pre, add_decayed_weights(weight_decay, mask), scale_by_trust_ratio(...), *post,
    scale_by_learning_rate(learning_rate))``, its state and results (tested bit for bit), in one
    update whose decay, trust-ratio and (without ``post``) learning-rate steps write into buffers
    this update owns: the output of ``pre`` (fresh by the protocol) or of the decay sum. That
    saves up to three passes over fresh memory per step; the chain's state layout (``"0"``,
    ``"1"``, ...) is kept, so states of either form load into the other."""
    lr_t = scale_by_learning_rate(learning_rate)
    reference = chain(*pre, add_decayed_weights(weight_decay, mask),
                      scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps), *post, lr_t)
    k, last = len(pre), str(len(pre) + 2 + len(post))
    has_decay = not (is_number(weight_decay) and weight_decay == 0)

    def update(grads, state, params=None):
        new_state, u = {}, grads
        for i, t in enumerate(pre):
            u, new_state[str(i)] = t.update(u, substate(state, str(i)), params)
        names, ds = leaves_of(u)
        ps = aligned(names, params, "params", like=ds)
        own = [bool(pre)] * len(ds)  # which buffers this update allocated (may be overwritten)
        if has_decay:  # d = g + wd p on the decayed leaves (the masked add_decayed_weights)
            ds = list(ds)
            for fresh in (True, False):
                idx = [i for i, f in enumerate(_decay_flags(mask, names, ps)) if f and own[i] == fresh]
                add = foreach.add_ if fresh else foreach.add
                for i, d in zip(idx, add([ds[i] for i in idx], [ps[i] for i in idx], alpha=weight_decay)):
                    ds[i], own[i] = d, True
        ds = _mul_owned(ds, own, trust_ratios(ds, ps, 0.0, trust_coefficient, eps))
        own = [True] * len(ds)
        new_state[str(k)], new_state[str(k + 1)] = substate(state, str(k)), substate(state, str(k + 1))
        for j, t in enumerate(post):  # their outputs may be their state (a momentum buffer): not owned
            u, new_state[str(k + 2 + j)] = t.update(build(names, ds), substate(state, str(k + 2 + j)), params)
            ds, own = aligned(names, u, "updates"), [False] * len(ds)
        ds, new_state[last] = learning_rate_scale_(ds, learning_rate, substate(state, last), all(own))
        return build(names, ds), new_state

    return GradientTransformation(reference.init, update)


def lamb(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, eps_root: float = 0.0,
         weight_decay: float = 0.0, mask=None, *, fused: bool = True) -> GradientTransformation:
    """LAMB (You et al. 2020, Alg. 2; Optax's ``lamb``): ``d = m̂ / (sqrt(v̂ + eps_root) + eps) + wd p``
    (decay on ``mask``'s leaves), ``u = -lr · (‖p‖ / ‖d‖) · d`` per leaf (ratio 1 where a norm is 0).

    ``fused`` (default True): the Adam direction from torch's fused kernel in plain eager
    (:func:`scale_by_adam`'s ``fused``; the foreach ops under torch.func and compile), as
    :func:`adamw` does; it agrees with the foreach form to float32 rounding. ``False``: the bits
    of ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate)``."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_nonneg("weight_decay", weight_decay)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    return _with_trust_ratio([scale_by_adam(b1, b2, eps, eps_root, fused=fused)], weight_decay, mask, 1.0, 0.0, [],
                             learning_rate)


def lars(learning_rate=1.0, weight_decay: float = 0.0, mask=None, trust_coefficient: float = 0.001,
         eps: float = 0.0, momentum: float = 0.9, nesterov: bool = False) -> GradientTransformation:
    """LARS (You et al. 2017, eq. 6-7; Optax's ``lars``): ``d = g + wd p``,
    ``d ← trust_coefficient · ‖p‖ / (‖d‖ + eps) · d`` per leaf, then momentum
    ``b = momentum b + d`` and ``u = -lr b`` (Nesterov optional)."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("momentum", momentum)
    check_nonneg("weight_decay", weight_decay)
    check_nonneg("trust_coefficient", trust_coefficient)
    check_nonneg("eps", eps)
    post = [] if is_number(momentum) and momentum == 0 else [trace(momentum, nesterov)]
    return _with_trust_ratio([], weight_decay, mask, trust_coefficient, eps, post, learning_rate)
