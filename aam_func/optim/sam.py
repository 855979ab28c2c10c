"""Sharpness-aware minimisation: a second gradient at an adversarially perturbed point.

Reference: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, *Sharpness-Aware Minimization for
Efficiently Improving Generalization*, ICLR 2021 (eq. 2 and Algorithm 1); adaptive SAM:
J. Kwon et al., *ASAM*, ICML 2021 (eq. 8). The PyTorch implementation users compare against is
``davda54/sam`` (``SAM.first_step`` / ``second_step``), whose formulas (including its
``1e-12`` in the denominator) this follows. Optax's ``contrib.sam`` instead alternates
adversarial and real steps across calls; here one ``update`` does both passes. Formulas:
``proofs/optim_modern.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..checks import check_bool
from .base import GradientTransformation, aligned, build, check_nonneg, check_transform, leaves_of, substate

__all__ = ["sam"]


def _perturbation(gs, ps, rho, adaptive: bool):
    """``e = rho · s ⊙ g / (‖s ⊙ g‖ + 1e-12)`` scaled by ``s`` once more: ``s = |p|`` (ASAM) or 1,
    i.e. ``e = rho · s² g / (‖s g‖ + 1e-12)`` (davda54/sam's ``first_step``)."""
    scaled = [p.abs() * g if adaptive else g for g, p in zip(gs, ps)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in scaled]))
    scale = rho / (norm + 1e-12)
    return [(p * p if adaptive else 1.0) * g * scale.to(g.dtype) for g, p in zip(gs, ps)]


def sam(base: GradientTransformation, rho: float = 0.05, adaptive: bool = False) -> GradientTransformation:
    """SAM around any ``base`` (use it outermost: its ``update`` takes an extra keyword)::

        updates, state = opt.update(grads, state, params, loss_fn=lambda p: loss(p, batch))

    ``grads`` is ``∇L(w)``; SAM takes ``e`` (:func:`_perturbation`), evaluates
    ``g_SAM = ∇L(w + e)`` with ``torch.func.grad(loss_fn)`` and returns ``base``'s update for
    ``g_SAM`` at ``w`` (Foret et al. Alg. 1). ``loss_fn(params) -> scalar`` is required: without it
    the update is a ValueError naming ``loss_fn``. Needs ``params``. State ``{"base": ...}``.
    """
    check_transform("sam's base", base)
    check_nonneg("rho", rho)
    check_bool("adaptive", adaptive)

    def init(params):
        return {"base": base.init(params)}

    def update(grads, state, params=None, *, loss_fn: Optional[Callable] = None):
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("sam's update needs loss_fn=: a function params -> scalar loss on the current batch "
                             f"(SAM takes a second gradient at the perturbed params), got {loss_fn!r}")
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        es = _perturbation(gs, ps, rho, adaptive)
        perturbed = build(names, [p + e for p, e in zip(ps, es)])
        g_sam = torch.func.grad(loss_fn)(perturbed)
        g_sam = build(names, aligned(names, g_sam, "loss_fn's gradient", "grads", like=gs))
        u, s = base.update(g_sam, substate(state, "base"), params)
        return u, {"base": s}

    return GradientTransformation(init, update)
