"""Layer-wise trust ratios for large batches: LARS and LAMB, as Optax composes them.

References: Y. You, I. Gitman, B. Ginsburg, *Large Batch Training of Convolutional Networks*
(LARS, 2017, eq. 6-7); Y. You et al., *Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes* (LAMB, ICLR 2020, Algorithm 2); Optax's ``lars``, ``lamb`` and
``scale_by_trust_ratio``, which these follow (there is no torch.optim reference). Formulas:
``proofs/optim_modern.md``.
"""

from __future__ import annotations

import torch

from ..checks import is_number
from .base import GradientTransformation, aligned, build, chain, check_beta, check_nonneg, leaves_of
from .transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace

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
        us = []
        for g, p in zip(gs, ps):
            pn = torch.clamp(torch.linalg.vector_norm(p), min=min_norm)
            gn = torch.clamp(torch.linalg.vector_norm(g), min=min_norm)
            ok = (pn > 0) & (gn > 0)
            ratio = trust_coefficient * pn / torch.where(ok, gn + eps, torch.ones_like(gn))
            us.append(g * torch.where(ok, ratio, torch.ones_like(ratio)).to(g.dtype))
        return build(names, us), state

    return GradientTransformation(lambda params: {}, update)


def lamb(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, eps_root: float = 0.0,
         weight_decay: float = 0.0, mask=None) -> GradientTransformation:
    """LAMB (You et al. 2020, Alg. 2; Optax's ``lamb``): ``d = m̂ / (sqrt(v̂ + eps_root) + eps) + wd p``
    (decay on ``mask``'s leaves), ``u = -lr · (‖p‖ / ‖d‖) · d`` per leaf (ratio 1 where a norm is 0)."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    return chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask),
                 scale_by_trust_ratio(), scale_by_learning_rate(learning_rate))


def lars(learning_rate=1.0, weight_decay: float = 0.0, mask=None, trust_coefficient: float = 0.001,
         eps: float = 0.0, momentum: float = 0.9, nesterov: bool = False) -> GradientTransformation:
    """LARS (You et al. 2017, eq. 6-7; Optax's ``lars``): ``d = g + wd p``,
    ``d ← trust_coefficient · ‖p‖ / (‖d‖ + eps) · d`` per leaf, then momentum
    ``b = momentum b + d`` and ``u = -lr b`` (Nesterov optional)."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("momentum", momentum)
    parts = [add_decayed_weights(weight_decay, mask), scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)]
    if not (is_number(momentum) and momentum == 0):
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
