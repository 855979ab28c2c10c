"""Small gradient transformations, each a pure ``(init, update)`` pair (Optax style).

Notation: ``g`` the incoming updates (gradients at the head of a chain), ``p`` the params,
``u`` the outgoing updates, ``t`` the 1-based step count, ``lr`` a float, a 0-d tensor or a
schedule evaluated at ``t - 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..checks import check_bool, check_number, is_number
from . import foreach
from .base import (
    GradientTransformation,
    aligned,
    build,
    check_beta,
    check_nonneg,
    entry,
    leaves_of,
    step_counter,
)

__all__ = [
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
    "add_decayed_weights",
    "clip_by_global_norm",
    "clip",
]


def lr_at(lr, count: Tensor):
    """A learning rate (float, tensor or schedule) at the step counter ``count`` (0-based)."""
    if callable(lr) and not isinstance(lr, Tensor):
        return foreach.as_scalar(lr(count))
    return lr


def _zeros_state(key: str) -> Callable:
    """``init(params) -> {key: zeros like params}``: the state of a one-buffer transformation."""

    def init(params):
        names, ps = leaves_of(params, "params")
        return {key: build(names, foreach.zeros_like(ps))}

    return init


def _one_buffer(key: str, what: str, step: Callable) -> GradientTransformation:
    """A transformation with one buffer per leaf under ``key`` (zeros at init):
    ``updates, buffers = step(grads, buffers)`` over the leaves' lists."""

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        us, bufs = step(gs, aligned(names, entry(state, key, what), what, like=gs, same_dtype=True))
        return build(names, us), {key: build(names, bufs)}

    return GradientTransformation(_zeros_state(key), update)


def scale(step_size) -> GradientTransformation:
    """``u = step_size * g``; no state. ``step_size`` is a number or a 0-d tensor."""
    if callable(step_size) and not isinstance(step_size, Tensor):
        raise TypeError(f"scale's step_size must be a number (use scale_by_schedule for schedules), got {step_size!r}")

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        return build(names, foreach.mul(gs, step_size)), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_schedule(schedule: Callable) -> GradientTransformation:
    """``u = schedule(t - 1) * g``; state ``{"count": int64}``."""
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> value, got {schedule!r}")

    def init(params):
        return {"count": step_counter()}

    def update(grads, state, params=None):
        count = state["count"]
        names, gs = leaves_of(grads)
        return build(names, foreach.mul(gs, foreach.as_scalar(schedule(count)))), {"count": count + 1}

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate, *, flip_sign: bool = True) -> GradientTransformation:
    """``u = -lr * g`` (``+lr`` with ``flip_sign=False``); ``lr`` a float, 0-d tensor or schedule."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate) and not isinstance(learning_rate, Tensor):
        return scale_by_schedule(lambda count: sign * foreach.as_scalar(learning_rate(count)))
    return scale(sign * learning_rate)


def learning_rate_scale_(us: list, learning_rate, state, own: bool):
    """:func:`scale_by_learning_rate`'s update (flip_sign) on a list, ``(-lr u, new state)``, the
    same bits and state; with ``own`` (``us`` are the caller's fresh buffers) it scales them in
    place. For fused transformations that end in the learning rate (``lamb``)."""
    if callable(learning_rate) and not isinstance(learning_rate, Tensor):
        count = entry(state, "count", "learning-rate state")
        factor, state = foreach.as_scalar(-1.0 * foreach.as_scalar(learning_rate(count))), {"count": count + 1}
    else:
        factor = -1.0 * learning_rate
    return (foreach.mul_(us, factor) if own else foreach.mul(us, factor)), state


def bias_corrections(count: Tensor, b1, b2) -> tuple[Tensor, Tensor]:
    """``1 - b1^t, 1 - b2^t`` in float64 (as torch.optim computes them in Python floats)."""
    t = count.to(foreach.SCALAR_DTYPE)
    return 1 - torch.pow(foreach.as_scalar(b1), t), 1 - torch.pow(foreach.as_scalar(b2), t)


def adam_moments(gs, mus, nus, b1, b2):
    """``m = b1 m + (1 - b1) g`` (as torch: lerp), ``v = b2 v + (1 - b2) g^2``; fresh buffers."""
    mus = foreach.lerp(mus, gs, 1 - b1)
    nus = foreach.mul(nus, b2)
    nus = foreach.addcmul_(nus, gs, gs, 1 - b2)
    return mus, nus


def adam_denominator(nus, bc2: Tensor, eps, eps_root):
    """``sqrt(v / bc2 + eps_root) + eps``; with ``eps_root == 0`` in torch.optim's order:
    ``sqrt(v) / sqrt(bc2) + eps``."""
    if is_number(eps_root) and eps_root == 0:
        denom = foreach.sqrt(nus)
        denom = foreach.div_(denom, torch.sqrt(bc2))
    else:
        denom = foreach.div(nus, bc2)
        denom = foreach.add_scalar_(denom, eps_root)
        denom = foreach.sqrt_(denom)
    return foreach.add_scalar_(denom, eps)


def adam_state(names, gs, state) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``(mu leaves, nu leaves, count)`` of an Adam state, each moment leaf checked against its
    gradient's shape and dtype before any kernel reads it (a state of other shapes would make
    the fused kernel read or write out of bounds)."""
    mus = aligned(names, entry(state, "mu", "adam state"), "adam state 'mu'", like=gs, same_dtype=True)
    nus = aligned(names, entry(state, "nu", "adam state"), "adam state 'nu'", like=gs, same_dtype=True)
    count = entry(state, "count", "adam state")
    if not isinstance(count, Tensor) or count.dim() != 0 or count.is_floating_point():
        raise ValueError(f"adam state 'count' must be a 0-d integer tensor, got {count!r}")
    return mus, nus, count


def adam_init(params):
    """Adam's state: ``{"count": 0, "mu": zeros like params, "nu": zeros like params}``."""
    names, ps = leaves_of(params, "params")
    return {
        "count": step_counter(),
        "mu": build(names, foreach.zeros_like(ps)),
        "nu": build(names, foreach.zeros_like(ps)),
    }


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, *,
                  fused: bool = False) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015), bias corrected:

    ``m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t) + eps_root) + eps)``

    ``eps_root`` (inside the root) keeps the derivative of ``u`` finite when ``v = 0`` (meta-learning).
    State ``{"count": int64, "mu": tree, "nu": tree}``. ``fused=True``: torch's fused Adam kernel
    where it applies (plain eager, see :func:`adamw`), the foreach ops elsewhere; the two agree to
    float32 rounding (the kernel orders the bias corrections differently), default ``False``.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_nonneg("eps", eps)
    check_nonneg("eps_root", eps_root)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        mus, nus, count = adam_state(names, gs, state)
        if fused:
            from .aliases import _can_fuse, _fused_direction

            if _can_fuse(gs, b1, b2, eps, eps_root):  # u = -lr m̂/(√v̂ + eps) at lr = -1
                us, mus, nus = _fused_direction(gs, mus, nus, count + 1, -1.0, b1, b2, eps)
                return build(names, us), {"count": count + 1, "mu": build(names, mus), "nu": build(names, nus)}
        count = count + 1
        bc1, bc2 = bias_corrections(count, b1, b2)
        mus, nus = adam_moments(gs, mus, nus, b1, b2)
        denom = adam_denominator(nus, bc2, eps, eps_root)
        us = foreach.div_into(mus, denom)  # into denom's fresh buffers
        us = foreach.div_(us, bc1)
        return build(names, us), {"count": count, "mu": build(names, mus), "nu": build(names, nus)}

    return GradientTransformation(adam_init, update)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction (Chen et al. 2023): ``u = sign(b1 m + (1-b1) g);  m = b2 m + (1-b2) g``.

    State ``{"mu": tree}``.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)

    def step(gs, mus):
        return foreach.sign(foreach.lerp(mus, gs, 1 - b1)), foreach.lerp(mus, gs, 1 - b2)

    return _one_buffer("mu", "lion state 'mu'", step)


def trace(decay: float = 0.9, nesterov: bool = False) -> GradientTransformation:
    """Momentum, as torch.optim.SGD (dampening 0): ``b = decay b + g``;
    ``u = b``, or ``u = g + decay b`` with ``nesterov``. State ``{"trace": tree}``."""
    check_beta("decay", decay)
    check_bool("nesterov", nesterov)

    def step(gs, bufs):
        bufs = foreach.add_(foreach.mul(bufs, decay), gs)
        return (foreach.add(gs, bufs, alpha=decay) if nesterov else bufs), bufs

    return _one_buffer("trace", "trace state", step)


def add_decayed_weights(weight_decay: float = 0.0, mask=None) -> GradientTransformation:
    """``u = g + weight_decay * p`` (L2 as a gradient term; before ``scale_by_learning_rate`` it is
    AdamW's decoupled decay). ``mask``: a bool tree, a predicate ``(name, leaf) -> bool`` or globs;
    unselected leaves pass through unchanged. Needs ``params``; no state."""
    check_nonneg("weight_decay", weight_decay)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        us = foreach.add(gs, ps, alpha=weight_decay)
        return build(names, us), state

    inner = GradientTransformation(lambda params: {}, update)
    if mask is None:
        return inner
    from .wrappers import masked

    return masked(inner, mask)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """As ``torch.nn.utils.clip_grad_norm_``: ``n = sqrt(sum ||g||^2)``,
    ``u = g * min(1, max_norm / (n + 1e-6))``. State ``{"global_norm": n}`` holds the norm
    before clipping, for logging (read it with :func:`aam_func.optim.last_global_norm`).
    ``max_norm`` must be > 0 (0 would zero every update: leave the clipping out instead)."""
    if not isinstance(max_norm, Tensor):
        check_number("max_norm", max_norm, min=0, min_open=True)

    def init(params):
        return {"global_norm": torch.zeros((), dtype=torch.float32)}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        norm = foreach.global_norm(gs)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return build(names, foreach.mul(gs, coef)), {"global_norm": norm.to(torch.float32)}

    return GradientTransformation(init, update)


def clip(max_delta: float) -> GradientTransformation:
    """``u = clamp(g, -max_delta, max_delta)`` elementwise (torch's clip_grad_value_); no state."""
    check_nonneg("max_delta", max_delta)

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        return build(names, foreach.clamp(gs, -max_delta, max_delta)), state

    return GradientTransformation(lambda params: {}, update)
