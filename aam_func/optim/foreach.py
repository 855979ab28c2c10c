"""List-of-tensor arithmetic: ``torch._foreach_*`` on the hot path, a per-leaf loop under vmap.

functorch has no batching rules for the ``_foreach_*`` ops (``vmap`` fails with "Batching rule
not implemented for aten::_foreach_lerp"), so while a functorch transform is active (``vmap``,
``grad``, ``jvp``) every helper falls back to plain per-tensor ops with the same math.

A *scalar* argument may be a Python number or a 0-d tensor (a step-dependent value such as a
bias correction or a scheduled learning rate); 0-d tensors keep ``torch.compile`` from
specialising on their value. 0-d scalars are float64 and do not change the leaves' dtype.
"""

from __future__ import annotations


import torch
from torch import Tensor

from ..checks import is_number
from ..ops._util import transforms_active

SCALAR_DTYPE = torch.float64  # dtype of step-dependent scalars (bias corrections, schedules)


def use_foreach() -> bool:
    """The fused ``torch._foreach_*`` kernels have no functorch batching/grad rules: use them only
    outside torch.func transforms (ops._util owns the reading of the transform stack)."""
    return not transforms_active()


def can_write(*lists) -> bool:
    """Whether a caller may write an op's result into a buffer it has just allocated (``out=``,
    in place): plain eager outside torch.func transforms and torch.compile (inductor fuses the
    plain form itself), and no leaf recorded by autograd (an ``out=`` op refuses inputs that
    require grad). Elsewhere the helpers below return fresh tensors, with the same values."""
    if not use_foreach() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled():
        return not any(x.requires_grad for xs in lists for x in xs)
    return True


def div_into(xs, ys):
    """``x / y`` for each pair, written into ``ys`` (buffers the caller has just allocated) where
    :func:`can_write`; a fresh list otherwise. One allocation fewer than :func:`div`, same values."""
    if xs and can_write(xs, ys):
        for x, y in zip(xs, ys):
            torch.div(x, y, out=y)
        return ys
    return [x / y for x, y in zip(xs, ys)]


def lerp_into(xs, ys, w):
    """``lerp(x, y, w)`` for each pair, written into ``ys`` (fresh buffers) where :func:`can_write`
    and ``w`` is a number; else :func:`lerp`. Same values as :func:`lerp`."""
    if xs and is_number(w) and can_write(xs, ys):
        for x, y in zip(xs, ys):
            torch.lerp(x, y, w, out=y)
        return ys
    return lerp(xs, ys, w)


def as_scalar(x) -> Tensor:
    """A Python number or tensor as a float64 0-d tensor (for step-dependent scalar math)."""
    if isinstance(x, Tensor):
        return x.to(SCALAR_DTYPE)
    return torch.tensor(float(x), dtype=SCALAR_DTYPE)


def mul(xs, s):
    """``x * s`` for each x; s a scalar or a list of tensors."""
    if use_foreach() and xs:
        return torch._foreach_mul(xs, s)
    if isinstance(s, list):
        return [x * y for x, y in zip(xs, s)]
    return [x * s for x in xs]


def mul_(xs, s):
    """In place, only on buffers the caller has just allocated."""
    if use_foreach() and xs:
        torch._foreach_mul_(xs, s)
        return xs
    return mul(xs, s)


def add(xs, ys, alpha=1.0):
    """``x + alpha * y``."""
    if use_foreach() and xs:
        if is_number(alpha):
            return torch._foreach_add(xs, ys, alpha=alpha)
        return torch._foreach_add(xs, torch._foreach_mul(ys, alpha))
    return [x + alpha * y for x, y in zip(xs, ys)]


def add_(xs, ys, alpha=1.0):
    if use_foreach() and xs:
        if is_number(alpha):
            torch._foreach_add_(xs, ys, alpha=alpha)
        else:
            torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
        return xs
    return add(xs, ys, alpha)


def add_scalar_(xs, s):
    if use_foreach() and xs:
        torch._foreach_add_(xs, s)
        return xs
    return [x + s for x in xs]


def div(xs, ys):
    if use_foreach() and xs:
        return torch._foreach_div(xs, ys)
    if isinstance(ys, list):
        return [x / y for x, y in zip(xs, ys)]
    return [x / ys for x in xs]


def div_(xs, s):
    if use_foreach() and xs:
        torch._foreach_div_(xs, s)
        return xs
    return div(xs, s)


def lerp(xs, ys, w):
    """``x + w * (y - x)``. Under ``torch.compile`` a tensor ``w`` (a scheduled or injected
    ``1 - b1``) takes the per-leaf form: dynamo cannot trace ``_foreach_lerp`` with a tensor weight,
    and the graph break it caused could not be resumed inside the optimizer."""
    if use_foreach() and xs and (is_number(w) or not torch.compiler.is_compiling()):
        return torch._foreach_lerp(xs, ys, w)
    return [torch.lerp(x, y, w if is_number(w) else w.to(x.dtype)) for x, y in zip(xs, ys)]


def addcmul_(xs, ys, zs, value):
    """``x + value * y * z`` in place (on fresh buffers only)."""
    if use_foreach() and xs:
        if is_number(value):
            torch._foreach_addcmul_(xs, ys, zs, value)
        else:
            torch._foreach_addcmul_(xs, torch._foreach_mul(ys, value), zs)
        return xs
    return [x + value * y * z for x, y, z in zip(xs, ys, zs)]


def addcdiv_(xs, ys, zs, value):
    """``x + value * y / z`` in place (on fresh buffers only)."""
    if use_foreach() and xs:
        if is_number(value):
            torch._foreach_addcdiv_(xs, ys, zs, value)
        elif not torch.compiler.is_compiling():
            # the Tensor overload wants one packed value per leaf (a 1-d CPU tensor)
            torch._foreach_addcdiv_(xs, ys, zs, value.detach().cpu().reshape(1).expand(len(xs)).contiguous())
        else:  # packed scalars do not trace; inductor fuses these anyway
            torch._foreach_add_(xs, torch._foreach_mul(torch._foreach_div(ys, zs), value))
        return xs
    return [x + value * (y / z) for x, y, z in zip(xs, ys, zs)]


def sqrt(xs):
    if use_foreach() and xs:
        return torch._foreach_sqrt(xs)
    return [torch.sqrt(x) for x in xs]


def sqrt_(xs):
    if use_foreach() and xs:
        torch._foreach_sqrt_(xs)
        return xs
    return sqrt(xs)


def sign(xs):
    if use_foreach() and xs:
        return torch._foreach_sign(xs)
    return [torch.sign(x) for x in xs]


def clamp(xs, lo, hi):
    if use_foreach() and xs:
        out = torch._foreach_clamp_min(xs, lo)
        torch._foreach_clamp_max_(out, hi)
        return out
    return [torch.clamp(x, lo, hi) for x in xs]


def zeros_like(xs):
    return [torch.zeros_like(x) for x in xs]


def norms(xs, ord=2.0):
    """Per-leaf vector norms, as a list of 0-d tensors."""
    if use_foreach() and xs:
        return list(torch._foreach_norm(xs, ord))
    return [torch.linalg.vector_norm(x, ord) for x in xs]


def global_norm(xs) -> Tensor:
    """``sqrt(sum_i ||x_i||^2)`` over all leaves (float32 at least), as torch's clip_grad_norm_."""
    if not xs:
        return torch.zeros((), dtype=torch.float32)
    ns = norms(xs)
    dtype = torch.float32
    for n in ns:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in ns]), 2.0)


def all_finite(xs) -> Tensor:
    """A 0-d bool tensor: every element of every leaf is finite (inf-norm per leaf, one reduction)."""
    if not xs:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack([n.float() for n in norms(xs, float("inf"))])).all()
