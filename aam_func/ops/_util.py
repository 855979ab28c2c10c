"""Which torch.func transforms are active: the one place the custom ops read functorch's
interpreter stack (and forward-mode AD's dual level) to choose how to run."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["transforms_active", "forward_ad_active", "vmap_active", "higher_order_active", "values_inspectable"]


def _levels(kind: str) -> int:
    """How many levels of the transform ``kind`` ("Grad", "Jvp", "Vmap", ...) are active."""
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return 0
    key = getattr(torch._C._functorch.TransformType, kind)
    return sum(1 for interp in stack if interp.key() == key)


def transforms_active() -> bool:
    """True inside any torch.func transform (grad, vjp, jvp, vmap, functionalize): the interpreter
    stack is non-empty. Read through ``_are_functorch_transforms_active``, which answers the same
    and which torch.compile can trace (``get_interpreter_stack`` is a graph break)."""
    return torch._C._are_functorch_transforms_active()


def forward_ad_active() -> bool:
    """True while forward-mode AD may be traced: inside ``torch.func.jvp`` or ``forward_ad.dual_level``."""
    return fwAD._current_level >= 0 or _levels("Jvp") > 0


def vmap_active() -> bool:
    """True inside ``torch.func.vmap``."""
    return _levels("Vmap") > 0


def higher_order_active() -> bool:
    """True when a derivative of the gradient may be taken: nested grad levels or forward AD."""
    return forward_ad_active() or _levels("Grad") >= 2


def values_inspectable() -> bool:
    """Whether a check may read tensor values (``.item()``, ``bool(t.all())``): not under vmap
    (batched values) and not while compiling (a graph break). Shape checks need no values."""
    return not torch.compiler.is_compiling() and not vmap_active()
