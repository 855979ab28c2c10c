"""The registry of custom ops: what ``tests/test_ops_registry.py`` holds every op to.

Every op module in ``aam_func/ops`` (each non-underscore ``.py`` file other than this one, and
each package, such as ``attention/``) registers each ``torch.autograd.Function`` it defines, at
import time::

    from .registry import OpSpec, register

    register(OpSpec(
        name="rope",                    # unique
        function=_RopeFunction,         # the torch.autograd.Function subclass (functorch form)
        op=rope,                        # public callable that runs the Function; op(*args, **kwargs)
        reference=rope_reference,       # composite twin, same call signature as ``op``
        proof="proofs/rope.md",         # note deriving forward/backward/jvp, relative to the repo root
        samples=_rope_samples,          # () -> list of (args, kwargs): small float64 inputs
        supports_forward_ad=True,       # the Function has a ``jvp`` rule
        supports_double_backward=False, # else a second backward must raise "double backward ... not supported"
    ))

``samples()`` returns a list of ``(args, kwargs)``. The floating tensors in ``args`` that have
``requires_grad=True`` are the differentiated inputs (gradcheck, jvp, vmap(grad)); everything
else (other tensors, ints, callables, kwargs) is held fixed. Keep them tiny (a few dozen
elements): every sample is gradchecked in float64 with ``check_forward_ad`` and
``check_batched_grad``. ``op`` and ``reference`` may return a tensor or a tuple of tensors.

What the registry test checks for each spec (and fails if missing):
- the module registers at least one op; ``proof`` exists and names the tests (``test_...``) that check it;
- ``function`` is a Function in functorch form (``setup_context``; ``generate_vmap_rule`` or
  ``vmap``; ``jvp`` when ``supports_forward_ad``);
- ``op == reference`` on every sample (outputs and gradients, float64);
- ``gradcheck(op, check_forward_ad=supports_forward_ad, check_batched_grad=True)``;
- ``gradgradcheck`` when ``supports_double_backward``, else a clear error on double backward;
- ``vmap(grad(op)) == vmap(grad(reference))`` over a batch of two perturbed copies of each sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["OpSpec", "register", "get", "all_specs", "specs_for_module"]


@dataclass(frozen=True)
class OpSpec:
    name: str
    function: type
    reference: Callable[..., Any]
    proof: str
    samples: Callable[[], list]
    op: Optional[Callable[..., Any]] = None  # None: ``function.apply``
    supports_forward_ad: bool = True
    supports_double_backward: bool = False

    def __post_init__(self):
        if not (isinstance(self.function, type) and issubclass(self.function, torch.autograd.Function)):
            raise TypeError(f"OpSpec {self.name!r}: function must be a torch.autograd.Function subclass, got {self.function!r}")
        if not callable(self.reference) or not callable(self.samples):
            raise TypeError(f"OpSpec {self.name!r}: reference and samples must be callables")
        if not isinstance(self.proof, str) or not self.proof.endswith(".md"):
            raise ValueError(f"OpSpec {self.name!r}: proof must be a path to a .md note, got {self.proof!r}")

    @property
    def module(self) -> str:
        """Short name of the ops module or package that defines the Function (e.g. ``"rope"``;
        ``"attention"`` for ``aam_func.ops.attention.kernel``)."""
        parts = self.function.__module__.split(".")
        inside_ops = len(parts) > 2 and parts[:2] == ["aam_func", "ops"]
        return parts[2] if inside_ops else parts[-1]

    def call(self, *args, **kwargs):
        return (self.op or self.function.apply)(*args, **kwargs)


_REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec``; re-registering the same name from the same module replaces it (reloads)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old.function.__module__ != spec.function.__module__:
        raise ValueError(f"op {spec.name!r} is already registered by {old.function.__module__}")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    if name not in _REGISTRY:
        raise KeyError(f"no op named {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_specs() -> list[OpSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def specs_for_module(module: str) -> list[OpSpec]:
    return [s for s in all_specs() if s.module == module]
