"""``bind(spec, params)``: a spec and its Params as a real ``torch.nn.Module``.

The module's ``named_parameters()`` are exactly ``tree.flatten(params)`` (same names, same
storage) and its ``forward`` is ``spec.apply``. So it works with ``functional_call``, DDP/FSDP,
``torch.compile``, hooks and ``torch.optim``, with no second implementation of the math:

    module = bind(model, params)
    torch.func.functional_call(module, flat_params, (input_ids,))  ==  model.apply(unflatten(flat_params), input_ids)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .tree import Params, flatten, unflatten

__all__ = ["bind", "Bound", "Node"]


class Node(nn.Module):
    """A plain container so that nested names like ``blocks.0.attn`` become submodules."""

    def __init__(self, tree: Mapping):
        super().__init__()
        for key, value in tree.items():
            if isinstance(value, Mapping):
                self.add_module(key, Node(value))
            elif isinstance(value, nn.Parameter):
                self.register_parameter(key, value)
            elif isinstance(value, Tensor):
                self.register_parameter(key, nn.Parameter(value, requires_grad=value.is_floating_point() or value.is_complex()))
            else:
                raise TypeError(f"param {key!r} must be a Tensor, got {type(value).__name__}")


def _lookup(module: nn.Module, name: str) -> Tensor:
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class Bound(Node):
    """A spec bound to parameters; see :func:`bind`."""

    def __init__(self, spec: Any, params: Params, method: str = "apply"):
        if not callable(getattr(spec, method, None)):
            raise TypeError(f"{type(spec).__name__} has no method {method!r} to bind as forward")
        super().__init__(params)
        object.__setattr__(self, "spec", spec)  # a frozen spec, not a submodule
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_names", tuple(flatten(params)))

    def params(self) -> Params:
        """The current parameters as a Params tree: the live tensors, or those that
        ``functional_call`` swapped in."""
        return unflatten({n: _lookup(self, n) for n in self._names})

    def forward(self, *args, **kwargs):
        return getattr(self.spec, self._method)(self.params(), *args, **kwargs)


def bind(spec: Any, params: Params, method: str = "apply") -> Bound:
    """A ``torch.nn.Module`` whose parameters are ``params`` (shared storage) and whose
    ``forward(*args, **kw)`` is ``spec.<method>(params, *args, **kw)``."""
    return Bound(spec, params, method)
