"""``bind(spec, params)``: a spec and its Params as a real ``torch.nn.Module``; and the other way,
``functionalize(module)``: any ``nn.Module`` as a pure ``apply(params, buffers, ...)``.

The module's ``named_parameters()`` are exactly ``tree.flatten(params)`` (same names, same
storage) and its ``forward`` is ``spec.apply``. So it works with ``functional_call``, DDP/FSDP,
``torch.compile``, hooks and ``torch.optim``, with no second implementation of the math:

    module = bind(model, params)
    torch.func.functional_call(module, flat_params, (input_ids,))  ==  model.apply(unflatten(flat_params), input_ids)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .tree import Params, flatten, unflatten
from .tree import map as map_tree

__all__ = ["bind", "Bound", "Node", "functionalize", "Functional", "ModuleApply"]


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


# --------------------------------------------------------------------------- any nn.Module, functionally


class ModuleApply:
    """``apply(params, buffers, *args, **kwargs) -> (out, new_buffers)`` of one module: see
    :func:`functionalize`. ``module``, ``param_names`` and ``buffer_names`` say what it runs."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.param_names = tuple(n for n, _ in module.named_parameters())
        self.buffer_names = tuple(n for n, _ in module.named_buffers())

    def _named(self, tree_: Any, what: str, expected: tuple, other: tuple, other_what: str) -> dict[str, Tensor]:
        if tree_ is None:
            tree_ = {}
        flat = flatten(tree_)
        misplaced = [n for n in flat if n in other]
        if misplaced:
            raise ValueError(f"{what} hold {', '.join(map(repr, misplaced))}, which the module has as "
                             f"{other_what}; pass {'it' if len(misplaced) == 1 else 'them'} in {other_what}")
        unknown = [n for n in flat if n not in expected]
        missing = [n for n in expected if n not in flat]
        if unknown or missing:
            parts = ([f"unknown: {', '.join(unknown)}"] if unknown else []) + \
                    ([f"missing: {', '.join(missing)}"] if missing else [])
            raise ValueError(f"{what} do not match {type(self.module).__name__}'s {what}; " + "; ".join(parts))
        for n, x in flat.items():
            if not isinstance(x, Tensor):
                raise TypeError(f"{what} leaf {n!r} must be a Tensor, got {type(x).__name__}: {x!r}")
        return flat

    def __call__(self, params: Any, buffers: Any, *args, **kwargs):
        p = self._named(params, "params", self.param_names, self.buffer_names, "buffers")
        new_buffers = map_tree(lambda b: b.clone(), buffers) if buffers is not None else None
        b = self._named(new_buffers, "buffers", self.buffer_names, self.param_names, "params")
        # the module writes its running statistics into the clones: the caller's buffers stay as they were
        out = torch.func.functional_call(self.module, {**p, **b}, args, kwargs, tie_weights=True, strict=False)
        return out, new_buffers

    def __repr__(self) -> str:
        return f"ModuleApply({type(self.module).__name__}: {len(self.param_names)} params, {len(self.buffer_names)} buffers)"


class Functional(NamedTuple):
    """:func:`functionalize`'s result: ``apply, params, buffers = functionalize(module)``."""

    apply: ModuleApply
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


def functionalize(module: nn.Module) -> Functional:
    """Any ``nn.Module`` as ``(apply, params, buffers)`` with a pure
    ``apply(params, buffers, *args, **kwargs) -> (out, new_buffers)``, over
    ``torch.func.functional_call``::

        apply, params, buffers = af.nn.functionalize(model)      # flat named_parameters() dicts
        out, buffers = apply(params, buffers, x)                 # BatchNorm: new running stats
        grads, buffers = torch.func.grad(loss, has_aux=True)(params, buffers, batch)

    ``params`` and ``buffers`` are ``{dotted name: tensor}`` dicts of the module's parameters
    (detached, sharing storage) and buffers; ``apply`` also takes them in any other tree form
    with the same dotted names (nested dicts, ...). Buffers are updated functionally: ``apply``
    clones them and the module's in-place updates (BatchNorm's running statistics in train mode,
    any ``register_buffer`` state) land in the clones, returned as ``new_buffers`` in the form
    ``buffers`` came in; the caller's tensors are never written. Train/eval is the module's own
    mode (``module.train()`` / ``module.eval()``). Tied parameters appear once, under their first
    name (as ``named_parameters()`` lists them), and stay tied: ``functional_call`` gives the
    value to every place that shares it. A parameter passed in ``buffers`` (or a buffer in
    ``params``), an unknown or missing name and a non-tensor leaf are errors naming the leaf.

    ``train.make_train_step(..., with_buffers=True)``, ``ensemble`` (:func:`aam_func.ensemble.stack`
    of several modules' params) and ``peft.lora.init(module)`` take the pieces as they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize needs a torch.nn.Module, got {type(module).__name__}")
    apply = ModuleApply(module)
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    return Functional(apply, params, buffers)
