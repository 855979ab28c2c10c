"""Ready-made optimizers (``sgd``, ``adam``, ``adamw``, ``lion``) and the weight-decay grouping.

``adam``/``adamw`` equal ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``
(tested) but run as one fused transformation: fewer passes over memory, and the operations in
``torch.optim.Adam``/``AdamW``'s order, so results follow torch to float32 rounding.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .. import tree
from ..checks import is_number
from . import base, foreach
from .base import (
    GradientTransformation,
    aligned,
    build,
    chain,
    check_beta,
    check_nonneg,
    leaves_of,
)
from .transforms import (
    adam_denominator,
    adam_init,
    adam_moments,
    adam_state,
    bias_corrections,
    lr_at,
    add_decayed_weights,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)

__all__ = ["sgd", "adam", "adamw", "lion", "decay_rule", "decay_mask"]


# ----------------------------------------------------------------------------- decay grouping


def _is_norm(component: str) -> bool:
    c = component.lower()
    return c.startswith(("ln", "norm")) or "norm" in c


def decay_rule(name: str, leaf) -> bool:
    """The guide's grouping, by name: no decay for biases, norm layers' parameters (modules named
    ``ln*``/``norm*``/``*norm*``) and any tensor with fewer than 2 dims; decay for the rest
    (linear and embedding weights, learnable positions, the LM head)."""
    parts = name.split(".")
    if parts[-1] == "bias" or any(_is_norm(p) for p in parts[:-1]):
        return False
    ndim = leaf.dim() if isinstance(leaf, Tensor) else len(leaf)
    return ndim >= 2


def decay_mask(params: Mapping, *, decay: Iterable[str] = (), no_decay: Iterable[str] = (),
               rule: Callable[[str, object], bool] = decay_rule) -> dict:
    """A tree of bools (True: apply weight decay) for ``adamw(mask=...)``.

    ``rule(name, leaf)`` decides by default (:func:`decay_rule`); glob patterns in ``no_decay``
    then ``decay`` override it, e.g. ``decay_mask(params, no_decay=["embed.*"])``.
    """
    decay, no_decay = list(decay), list(no_decay)

    def pick(name, leaf):
        if any(fnmatch.fnmatchcase(name, p) for p in decay):
            return True
        if any(fnmatch.fnmatchcase(name, p) for p in no_decay):
            return False
        return bool(rule(name, leaf))

    return tree.select(params, pick)


def _decay_flags(mask, names, leaves) -> list[bool]:
    """Which leaves decay: ``mask`` is a bool tree of any form (looked up by dotted name), a
    predicate ``(name, leaf)`` or globs on dotted names (:func:`aam_func.tree.selector`)."""
    if mask is None:
        return [True] * len(names)
    try:
        pred = tree.selector(mask)
        return [bool(pred(n, x)) for n, x in zip(names, leaves)]
    except ValueError as e:
        raise ValueError(f"weight-decay mask does not cover the params: {e}") from None


# ----------------------------------------------------------------------------- adam family


def _can_fuse(gs, b1, b2, eps, eps_root) -> bool:
    """torch's fused multi-tensor Adam kernel applies: plain eager, Python-number
    hyperparameters, one device and floating leaves of the kernel's dtypes."""
    if not (base.eager() and gs and all(is_number(x) for x in (b1, b2, eps)) and eps_root == 0):
        return False
    dev = gs[0].device
    return dev.type in ("cpu", "cuda") and all(
        g.device == dev and g.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for g in gs
    )


def _fused_direction(gs, mus, nus, count: Tensor, lr, b1, b2, eps):
    """``(u, m, v)`` with ``u = -lr * m_hat / (sqrt(v_hat) + eps)`` from ``torch._fused_adam_``.

    The kernel works in place, so it runs on fresh buffers: copies of ``m`` and ``v`` (the old
    state stays valid) and zeros for the parameters, which it turns into ``0 - lr m_hat / denom``.
    One pass over memory instead of eight foreach kernels.
    """
    us = foreach.zeros_like(gs)
    mus = [m.clone() for m in mus]
    nus = [v.clone() for v in nus]
    dev = gs[0].device
    # read, not written, by the kernel; on CUDA it reads the step through a device pointer
    steps = [count.to(device=dev, dtype=torch.float32)] * len(gs)
    if is_number(lr):
        lr_arg = lr
    elif dev.type == "cpu":
        lr_arg = lr.detach().to(torch.float64)
    else:  # the CUDA kernel reads a tensor learning rate as float32 on the parameters' device
        lr_arg = lr.detach().to(device=dev, dtype=torch.float32)
    torch._fused_adam_(us, list(gs), mus, nus, [], steps, lr=lr_arg, beta1=b1, beta2=b2,
                       weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    return us, mus, nus


def _adam_family(learning_rate, b1, b2, eps, eps_root, weight_decay, mask, decoupled, fused) -> GradientTransformation:
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_nonneg("eps", eps)
    check_nonneg("eps_root", eps_root)
    check_nonneg("weight_decay", weight_decay)
    has_decay = not (is_number(weight_decay) and weight_decay == 0)
    if fused not in (None, True, False):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        mus, nus, count = adam_state(names, gs, state)
        lr = lr_at(learning_rate, count)
        count = count + 1
        bc1, bc2 = bias_corrections(count, b1, b2)
        if has_decay:
            ps = aligned(names, params, "params", like=gs)
            flags = _decay_flags(mask, names, ps)
            dec = [i for i, f in enumerate(flags) if f]
            if not decoupled and dec:  # torch.optim.Adam's L2: g <- g + wd * p
                gs = list(gs)
                for i, g in zip(dec, foreach.add([gs[i] for i in dec], [ps[i] for i in dec], alpha=weight_decay)):
                    gs[i] = g
        else:
            dec = []
        if fused is not False and _can_fuse(gs, b1, b2, eps, eps_root):
            us, mus, nus = _fused_direction(gs, mus, nus, count, lr, b1, b2, eps)
            if decoupled and dec:  # u += -lr wd p on the decayed leaves (fresh buffers)
                du = foreach.add_([us[i] for i in dec], [ps[i] for i in dec], alpha=-lr * weight_decay)
                for i, u in zip(dec, du):
                    us[i] = u
            return build(names, us), {"count": count, "mu": build(names, mus), "nu": build(names, nus)}
        if fused:
            raise ValueError("fused=True needs eager mode, Python-number b1/b2/eps, eps_root=0 and "
                             "float leaves on one CPU/CUDA device")
        mus, nus = adam_moments(gs, mus, nus, b1, b2)
        denom = adam_denominator(nus, bc2, eps, eps_root)
        step_size = -lr / bc1  # 0-d float64, as torch's Python-float step size
        us = [None] * len(names)
        if decoupled and dec:
            # u = -lr wd p + step_size m / denom  (torch: p *= 1 - lr wd; p += step_size m / denom)
            du = foreach.mul([ps[i] for i in dec], -lr * weight_decay)
            du = foreach.addcdiv_(du, [mus[i] for i in dec], [denom[i] for i in dec], step_size)
            for i, u in zip(dec, du):
                us[i] = u
        rest = [i for i in range(len(names)) if us[i] is None]
        if rest:
            # 0 + step_size * m / denom: addcdiv rounds as torch's p.addcdiv_ does, so p + u
            # lands on torch's result bit for bit (div-then-mul does not).
            ru = foreach.zeros_like([mus[i] for i in rest])
            ru = foreach.addcdiv_(ru, [mus[i] for i in rest], [denom[i] for i in rest], step_size)
            for i, u in zip(rest, ru):
                us[i] = u
        return build(names, us), {"count": count, "mu": build(names, mus), "nu": build(names, nus)}

    return GradientTransformation(adam_init, update)


def adam(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
         weight_decay: float = 0.0, mask=None, *, fused: bool | None = None) -> GradientTransformation:
    """``torch.optim.Adam``: ``u = -lr * m_hat / (sqrt(v_hat + eps_root) + eps)``; a nonzero
    ``weight_decay`` is torch's coupled L2 (``g <- g + wd p`` before the moments).
    State ``{"count", "mu", "nu"}``. ``learning_rate`` is a float, a 0-d tensor or a schedule.

    ``fused``: ``None`` (default) uses torch's fused multi-tensor Adam kernel on fresh buffers
    where it applies (plain eager, see ``_can_fuse``) and ``torch._foreach_*`` elsewhere (under
    ``torch.compile``, ``vmap``, ``grad``); ``False`` always takes the foreach path, whose
    operations are torch.optim's foreach Adam's, in order; ``True`` requires the kernel."""
    return _adam_family(learning_rate, b1, b2, eps, eps_root, weight_decay, mask, False, fused)


def adamw(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
          mask=None, eps_root: float = 0.0, *, fused: bool | None = None) -> GradientTransformation:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019, decoupled decay):
    ``u = -lr * (m_hat / (sqrt(v_hat + eps_root) + eps) + wd * p)``, the decay on leaves selected by
    ``mask`` (a bool tree such as :func:`decay_mask`, a predicate ``(name, leaf)`` such as
    :func:`decay_rule`, or globs; ``None``: all). Defaults are torch's; ``fused`` as in :func:`adam`."""
    return _adam_family(learning_rate, b1, b2, eps, eps_root, weight_decay, mask, True, fused)


def sgd(learning_rate=1e-3, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
        mask=None) -> GradientTransformation:
    """``torch.optim.SGD`` (dampening 0): ``g <- g + wd p``; ``b = momentum b + g``;
    ``u = -lr * (g + momentum b if nesterov else b)``; plain ``u = -lr g`` when momentum is 0."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_beta("momentum", momentum)
    check_nonneg("weight_decay", weight_decay)
    if nesterov and is_number(momentum) and momentum == 0:
        raise ValueError("nesterov momentum needs momentum > 0, got momentum=0")
    parts = []
    if not (is_number(weight_decay) and weight_decay == 0):
        parts.append(add_decayed_weights(weight_decay, mask))
    if not (is_number(momentum) and momentum == 0):
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def lion(learning_rate=1e-4, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 0.0,
         mask=None) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``u = -lr * (sign(b1 m + (1-b1) g) + wd p)``;
    ``m = b2 m + (1-b2) g``. Use a 3-10x smaller learning rate than AdamW."""
    check_nonneg("learning_rate", learning_rate, allow_schedule=True)
    check_nonneg("weight_decay", weight_decay)
    parts = [scale_by_lion(b1, b2)]
    if not (is_number(weight_decay) and weight_decay == 0):
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
