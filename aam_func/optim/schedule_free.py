"""Schedule-free AdamW: no learning-rate schedule to tune; evaluate at the averaged point ``x``.

Reference: A. Defazio, X. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, *The Road Less
Scheduled*, NeurIPS 2024 (eqs. 1-3 and Algorithm 1), as ``schedulefree.AdamWScheduleFree``
implements it (its ``step`` and ``eval``), which this module follows. Formulas:
``proofs/optim_modern.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_int, check_number, is_number
from . import base, foreach
from .base import GradientTransformation, aligned, build, check_beta, check_nonneg, entry, leaves_of, step_counter
from .transforms import lr_at

__all__ = ["schedule_free_adamw", "schedule_free_eval_params"]

_F64 = foreach.SCALAR_DTYPE


def _init(b1):
    def init(params):
        names, ps = leaves_of(params, "params")
        return {
            "count": step_counter(),
            "z": build(names, [p.clone() for p in ps]),
            "nu": build(names, foreach.zeros_like(ps)),
            "weight_sum": torch.zeros((), dtype=_F64),
            "lr_max": torch.full((), -1.0, dtype=_F64),
            "b1": foreach.as_scalar(b1),  # read by schedule_free_eval_params
        }

    return init


def _weights(count, lr, state, warmup_steps, r, weight_lr_power):
    """``(lr_t, c_{t+1}, new weight_sum, new lr_max)`` (the reference's ``step`` prologue):
    ``lr_t = lr · min(1, (k+1)/warmup)``, ``w = (k+1)^r · lr_max^power``, ``c = w / Σ w`` (0 while Σ w = 0)."""
    k1 = (count + 1).to(_F64)
    lr = foreach.as_scalar(lr)
    if warmup_steps:
        lr = lr * torch.clamp(k1 / warmup_steps, max=1.0)
    lr_max = torch.maximum(lr, entry(state, "lr_max", "schedule_free state").to(_F64))
    weight = k1 ** r * lr_max ** weight_lr_power
    weight_sum = entry(state, "weight_sum", "schedule_free state").to(_F64) + weight
    ckp1 = torch.where(weight_sum > 0, weight / torch.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    return lr, ckp1, weight_sum, lr_max


def schedule_free_adamw(learning_rate=0.0025, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                        weight_lr_power: float = 2.0) -> GradientTransformation:
    """``schedulefree.AdamWScheduleFree``. The params the loss sees are ``y``; the state holds
    ``z`` and ``v``; the point to evaluate is ``x = (y - (1 - b1) z) / b1``
    (:func:`schedule_free_eval_params`). At step ``t`` (``k = t - 1``):

    ``v = b2 v + (1 - b2) g²;  ĝ = g / (sqrt(v / (1 - b2^t)) + eps) + wd y``
    ``y ← lerp(y, z, c) + lr_t (b1 (1 - c) - 1) ĝ;  z ← z - lr_t ĝ``

    with ``lr_t``, ``c`` from :func:`_weights` (Defazio et al. eq. 1-3 rewritten in ``y``, ``z``).
    ``learning_rate`` may be a schedule (an extension; the reference takes a constant and its own
    linear warmup ``warmup_steps``). State ``{"count", "z", "nu", "weight_sum", "lr_max", "b1"}``.
    """
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("b1", b1)
    if is_number(b1) and b1 == 0:
        raise ValueError("b1 must be > 0 for schedule_free_adamw (x = (y - (1 - b1) z) / b1), got 0")
    check_beta("b2", b2)
    check_nonneg("eps", eps)
    check_nonneg("weight_decay", weight_decay)
    check_int("warmup_steps", warmup_steps, min=0)
    check_number("r", r, min=0)
    check_number("weight_lr_power", weight_lr_power, min=0)
    has_decay = not (is_number(weight_decay) and weight_decay == 0)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ys = aligned(names, params, "params", like=gs)
        zs = aligned(names, entry(state, "z", "schedule_free state"), "schedule_free state 'z'", like=gs, same_dtype=True)
        nus = aligned(names, entry(state, "nu", "schedule_free state"), "schedule_free state 'nu'", like=gs,
                      same_dtype=True)
        count = entry(state, "count", "schedule_free state")
        lr, ckp1, weight_sum, lr_max = _weights(count, lr_at(learning_rate, count), state, warmup_steps, r,
                                                weight_lr_power)
        count = count + 1
        bc2 = 1 - torch.pow(foreach.as_scalar(b2), count.to(_F64))
        nus = foreach.addcmul_(foreach.mul(nus, b2), gs, gs, 1 - b2)
        denom = foreach.add_scalar_(foreach.sqrt_(foreach.div(nus, bc2)), eps)
        # the in-place steps below write only into buffers this call allocated (ĝ into denom's);
        # under torch.func transforms they return fresh tensors with the same values
        ghat = foreach.div_into(gs, denom)
        if has_decay:
            ghat = foreach.add_(ghat, ys, alpha=weight_decay)
        # z_new = z - lr ĝ;  y_new - y = c (z - y) + lr (b1 (1 - c) - 1) ĝ
        # (the reference: z.sub_(ĝ, alpha=lr); y.lerp_(z, c); y.add_(ĝ, alpha=lr (b1 (1 - c) - 1)))
        step = lr * (b1 * (1 - ckp1) - 1)
        us = foreach.mul_(foreach.add(zs, ys, alpha=-1.0), ckp1)
        if base.eager() and foreach.can_write(gs, ys, zs, [step]):
            # plain eager: the reference's fused multiply-adds with Python-float scalars (float()
            # of these 0-d float64 scalars; one pass per leaf instead of a product and a sum)
            new_z = torch._foreach_add(zs, ghat, alpha=-float(lr))
            torch._foreach_add_(us, ghat, alpha=float(step))
        else:  # under torch.func / compile: a product, then a sum (float32 rounding apart)
            new_z = foreach.add(zs, ghat, alpha=-lr)
            us = foreach.add_(us, ghat, alpha=step)
        return build(names, us), {"count": count, "z": build(names, new_z), "nu": build(names, nus),
                                  "weight_sum": weight_sum, "lr_max": lr_max, "b1": entry(state, "b1", "schedule_free state")}

    return GradientTransformation(_init(b1), update)


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The point to evaluate, ``x = lerp(y, z, 1 - 1/b1)`` (the reference's ``optimizer.eval()``),
    for the leaves of ``params`` (``y``) that a schedule-free state found at any depth of ``state``
    covers; other leaves unchanged. Pure: ``params`` is not modified. Also reachable as
    :func:`aam_func.optim.eval_params`."""
    from .averaging import eval_params

    return eval_params(state, params)


def sf_point(sub: dict, names, ps):
    """``x`` for the leaves ``names`` of a schedule-free sub-state ``sub``."""
    zs = aligned(names, sub["z"], "schedule_free state 'z'", like=ps)
    w = 1 - 1 / foreach.as_scalar(sub["b1"])
    return [torch.lerp(y, z, w.to(y.dtype)) for y, z in zip(ps, zs)]
