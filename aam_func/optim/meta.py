"""Unrolled optimisation for meta-gradients: differentiate through ``steps`` pure updates.

Every transformation in :mod:`aam_func.optim` is out of place and keeps its step-dependent
scalars as tensors (no ``.item()`` on the path), and under ``torch.func`` transforms the
``_foreach`` kernels give way to per-leaf ops, so ``torch.func.grad`` of a function that runs
:func:`unroll` differentiates through every update: learning-rate and other hyperparameter
gradients (pass them as tensors), data-weight gradients, gradients through the initial params
(MAML). The ``eps_root`` of Adam keeps ``d/dg sqrt(v)`` finite at ``v = 0``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ..checks import check_int
from .base import GradientTransformation, apply_updates, check_transform

__all__ = ["unroll"]


def _batch_at(batches, t: int):
    if batches is None:
        return ()
    if callable(batches):
        return (batches(t),)
    if isinstance(batches, Sequence) and len(batches):
        return (batches[t % len(batches)],)
    raise TypeError(f"batches must be None, a non-empty sequence or a function step -> batch, got {batches!r}")


def _takes_loss_fn(opt: GradientTransformation) -> bool:
    try:
        return "loss_fn" in inspect.signature(opt.update).parameters
    except (TypeError, ValueError):
        return False


def unroll(loss: Callable, opt: GradientTransformation, params: Any, steps: int, *,
           batches: Optional[Sequence | Callable[[int], Any]] = None, state: Any = None) -> tuple[Any, Any]:
    """``steps`` updates of ``opt`` on ``loss``: ``g_t = ∇loss(p_t[, batch_t])``,
    ``u_t, s_t = opt.update(g_t, s_{t-1}, p_t)``, ``p_{t+1} = p_t + u_t``. Returns
    ``(p_steps, s_steps)``, both differentiable in everything ``loss``, ``opt`` and ``params``
    close over::

        def val_after(lr):                      # a learning-rate hypergradient
            p, _ = optim.unroll(train_loss, optim.sgd(lr), params, 10, batches=train_batches)
            return val_loss(p)
        torch.func.grad(val_after)(torch.tensor(0.1))

    ``batches``: None (``loss(params)``), a sequence (step ``t`` uses ``batches[t % len]``) or a
    function ``t -> batch``. ``state``: the starting state (default ``opt.init(params)``). An
    optimizer whose ``update`` takes ``loss_fn`` (:func:`sam`, :func:`sophia`) gets
    ``lambda p: loss(p[, batch_t])``.
    """
    check_transform("unroll's opt", opt)
    check_int("steps", steps, min=0)
    if not callable(loss):
        raise TypeError(f"loss must be a function params[, batch] -> scalar, got {loss!r}")
    state = opt.init(params) if state is None else state
    with_loss = _takes_loss_fn(opt)
    for t in range(steps):
        extra = _batch_at(batches, t)
        grads = torch.func.grad(loss)(params, *extra)
        kwargs = {"loss_fn": (lambda p, extra=extra: loss(p, *extra))} if with_loss else {}
        updates, state = opt.update(grads, state, params, **kwargs)
        params = apply_updates(params, updates)
    return params, state
