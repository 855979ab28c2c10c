"""KFAC as an ``optim`` transformation: the gradient of each factored weight multiplied by
(A ⊗ G + λI)⁻¹ (``kfac.inverse_product``), the others passed through, then any inner
transformation (SGD, Adam, ...).

    opt = kfac_preconditioned(af.optim.sgd(0.1), damping=1e-3, decay=0.95)
    state = opt.init(params)
    for step, batch in enumerate(loader):
        facs = kfac.collect(problem, params, x, y, fisher="mc") if step % 10 == 0 else None
        updates, state = opt.update(grads, state, params, factors=facs)
        params = af.optim.apply_updates(params, updates)

The state is Params (saves and loads like any optimizer state): ``{"A": {...}, "G": {...},
"inner": ...}`` with the factors' running averages keyed by weight name (dots as "/"), refreshed
as F ← decay·F + (1 - decay)·F_new whenever ``factors=`` is given (the first time: F_new). A
step before any factors is an error naming the argument.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .. import tree
from ..checks import check_number
from ..optim.base import GradientTransformation, check_transform
from .kfac import Factors, inverse_product

__all__ = ["kfac_preconditioned"]


def _key(name: str) -> str:
    return name.replace(".", "/")


def kfac_preconditioned(inner: GradientTransformation, *, damping: float = 1e-3, decay: float = 0.95) -> GradientTransformation:
    """``inner`` applied to KFAC-preconditioned gradients; see the module doc."""
    check_transform("inner", inner)
    check_number("damping", damping, min=0, min_open=True)
    check_number("decay", decay, min=0, max=1, max_open=True)
    meta: dict = {}  # weight name -> its Factor with A, G dropped (static: bias name, orientation)

    def init(params):
        return {"A": {}, "G": {}, "inner": inner.init(params)}

    def refresh(state, factors: Factors):
        if not isinstance(factors, Factors):
            raise TypeError(f"factors must be kfac.collect(...)'s Factors, got {type(factors).__name__}")
        A, G = dict(state["A"]), dict(state["G"])
        for name, f in factors.factors.items():
            k = _key(name)
            meta[name] = f
            if k in A:
                A[k] = decay * A[k] + (1 - decay) * f.A
                G[k] = decay * G[k] + (1 - decay) * f.G
            else:
                A[k], G[k] = f.A, f.G
        return {**state, "A": A, "G": G}

    def update(grads, state, params=None, factors: Optional[Factors] = None):
        if factors is not None:
            state = refresh(state, factors)
        if not state["A"]:
            raise ValueError("factors: the KFAC preconditioner has no factors yet; pass factors=kfac.collect(...) "
                             "on the first step")
        flat = tree.flatten(grads)
        current = {n: replace(f, A=state["A"][_key(n)], G=state["G"][_key(n)], eig=None)
                   for n, f in meta.items() if _key(n) in state["A"]}
        pre = inverse_product(Factors(current, {}, "", ""), flat, damping=damping)
        new = tree.unflatten_like(grads, {n: pre.get(n, g) for n, g in flat.items()})
        updates, inner_state = inner.update(new, state["inner"], params)
        return updates, {**state, "inner": inner_state}

    return GradientTransformation(init, update)
