"""Small helpers shared by the custom ops: detecting active transforms."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def forward_ad_active(*tensors: torch.Tensor) -> bool:
    """True while forward-mode AD may be traced: inside ``torch.func.jvp`` or ``forward_ad.dual_level``."""
    if fwAD._current_level >= 0:
        return True
    stack = torch._C._functorch.get_interpreter_stack()
    if stack:
        for interp in stack:
            if interp.key() == torch._C._functorch.TransformType.Jvp:
                return True
    return False


def vmap_active() -> bool:
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)
