"""Sophia: a clipped, diagonal-Hessian-preconditioned update (Sophia-H, Hutchinson estimator).

Reference: H. Liu, Z. Li, D. Hall, P. Liang, T. Ma, *Sophia: A Scalable Stochastic Second-order
Optimizer for Language Model Pre-training*, ICLR 2024 (Algorithm 3, and §2.3 for the
Hutchinson estimator ``ĥ = u ⊙ (∇²L u)``, ``u ~ N(0, I)``). Chosen over SOAP because its update
is elementwise (Adam's memory: two buffers) and its curvature is one Hessian-vector product
every ``k`` steps, which ``torch.func`` gives exactly (``jvp`` of ``grad``); SOAP needs a
per-matrix eigendecomposition of Shampoo's factors. There is no PyTorch reference installable
here: the tests check the paper's equations in float64. Formulas: ``proofs/optim_modern.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..checks import check_int, is_number
from . import foreach
from .base import (GradientTransformation, aligned, build, check_beta, check_nonneg, cond, entry, leaves_of,
                   step_counter)
from .transforms import lr_at

__all__ = ["sophia", "hutchinson"]


def hutchinson(loss_fn: Callable, params, seed: int, step) -> object:
    """``ĥ = u ⊙ (∇²L(params) u)``, ``u ~ N(0, I)`` drawn leaf by leaf in flatten order from
    ``torch.Generator().manual_seed(seed + step)`` (``step`` the 1-based count): one Hessian-vector
    product by ``torch.func.jvp`` of ``torch.func.grad``."""
    names, ps = leaves_of(params, "params")
    gen = torch.Generator().manual_seed(int(seed) + int(step))
    us = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in ps]
    _, hv = torch.func.jvp(torch.func.grad(loss_fn), (params,), (build(names, us),))
    hv = aligned(names, hv, "Hessian-vector product", "params", like=ps)
    return build(names, [u * h for u, h in zip(us, hv)])


def sophia(learning_rate=1e-4, b1: float = 0.965, b2: float = 0.99, gamma: float = 0.01, eps: float = 1e-12,
           weight_decay: float = 0.1, update_every: int = 10, seed: int = 0) -> GradientTransformation:
    """Sophia-H (Liu et al. 2024, Alg. 3), per leaf at step ``t``:

    ``m = b1 m + (1 - b1) g``;  every ``k = update_every`` steps (``t mod k = 1``) ``h = b2 h + (1 - b2) ĥ``
    (:func:`hutchinson` at the current params);  ``u = -lr wd p - lr clip(m / max(γ h, ε), 1)``.

    Its ``update`` needs ``loss_fn=`` (``params -> loss`` on the batch), used on estimator steps
    (use Sophia outermost, like :func:`sam`); without it the update is a ValueError naming it.
    ``eps`` keeps the ratio finite where ``h ≤ 0`` (then the step is ``±lr``: sign descent).
    State ``{"count", "mu", "hess"}``.
    """
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_nonneg("gamma", gamma)
    check_nonneg("eps", eps)
    check_nonneg("weight_decay", weight_decay)
    check_int("update_every", update_every, min=1)
    check_int("seed", seed)
    has_decay = not (is_number(weight_decay) and weight_decay == 0)

    def init(params):
        names, ps = leaves_of(params, "params")
        zeros = lambda: build(names, foreach.zeros_like(ps))  # noqa: E731
        return {"count": step_counter(), "mu": zeros(), "hess": zeros()}

    def update(grads, state, params=None, *, loss_fn: Optional[Callable] = None):
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("sophia's update needs loss_fn=: a function params -> scalar loss on the current batch "
                             f"(for the Hutchinson Hessian estimate), got {loss_fn!r}")
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        mus = aligned(names, entry(state, "mu", "sophia state"), "sophia state 'mu'", like=gs, same_dtype=True)
        hs = aligned(names, entry(state, "hess", "sophia state"), "sophia state 'hess'", like=gs, same_dtype=True)
        count = entry(state, "count", "sophia state")
        lr = lr_at(learning_rate, count)
        count = count + 1
        mus = foreach.lerp(mus, gs, 1 - b1)

        def estimate():
            est = aligned(names, hutchinson(loss_fn, params, seed, count), "Hutchinson estimate", like=gs)
            return build(names, foreach.lerp(hs, est, 1 - b2)), {}

        new_h, _ = cond((count - 1) % update_every == 0, estimate, lambda: (build(names, hs), {}))
        hs = aligned(names, new_h, "sophia state 'hess'", like=gs)
        us = []
        for g, p, m, h in zip(gs, ps, mus, hs):
            ratio = torch.clamp(m / torch.clamp(gamma * h, min=eps), -1.0, 1.0)
            u = -lr * ratio if is_number(lr) else -(lr.to(g.dtype)) * ratio
            if has_decay:
                u = u - (lr * weight_decay if is_number(lr) else (lr * weight_decay).to(g.dtype)) * p
            us.append(u)
        return build(names, us), {"count": count, "mu": build(names, mus), "hess": build(names, hs)}

    return GradientTransformation(init, update)
