"""Which weights LoRA adapts: :class:`Target` (name, sizes, layout) and their discovery in
Params, flat state_dicts and ``nn.Module`` s (nn.Linear, transformers' Conv1D, aam_func ``bind``).

Targets are chosen by globs or plain names (a plain name also matches as a dotted suffix, as
PEFT's ``target_modules=["c_attn"]``) or by a predicate over weight names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import Tensor, nn

from ..tree import flatten

__all__ = ["Target", "TargetSpec", "targets_of", "module_candidates", "conv1d_type", "is_flat"]

TargetSpec = Union[str, Iterable[str], Callable[[str], bool]]


@dataclass(frozen=True)
class Target:
    """One adapted weight: ``name`` is its dotted name minus ``.weight``. ``fan_in_fan_out``:
    the weight is stored (in, out) (transformers' Conv1D) instead of nn.Linear's (out, in)."""

    name: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)


# --------------------------------------------------------------------------- target discovery


def conv1d_type() -> Optional[type]:
    """transformers' ``Conv1D`` class (GPT-2's linear layers: weight (in, out), computed by
    ``torch.addmm``), or None when transformers is absent or has moved it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers absent or changed: no Conv1D to recognise
        return None
    return Conv1D


def is_flat(params: Mapping) -> bool:
    return not any(isinstance(v, Mapping) for v in params.values())


def _params_candidates(params: Any, fan_in_fan_out) -> list[Target]:
    """Every 2-D floating ``*.weight`` of a Params tree (any form: nested, flat, ...) as a candidate."""
    flat = flatten(params)
    out = []
    for key, w in flat.items():
        if not (key.endswith(".weight") and isinstance(w, Tensor) and w.dim() == 2 and w.is_floating_point()):
            continue
        name = key[: -len(".weight")]
        fif = _match_fan_in_fan_out(name, fan_in_fan_out)
        a, b = w.shape
        out.append(Target(name, a if fif else b, b if fif else a, fif))
    return out


def _match_fan_in_fan_out(name: str, fan_in_fan_out) -> bool:
    if isinstance(fan_in_fan_out, bool):
        return fan_in_fan_out
    if fan_in_fan_out is None:
        return False
    pats = [fan_in_fan_out] if isinstance(fan_in_fan_out, str) else list(fan_in_fan_out)
    return any(_name_matches(name, p) for p in pats)


def module_candidates(module: nn.Module) -> list[Target]:
    """nn.Linear and transformers' Conv1D submodules (and aam_func ``bind`` trees) as candidates."""
    from ..nn import Bound

    if isinstance(module, Bound):
        return _params_candidates(module.params(), False)
    conv1d = conv1d_type()
    out = []
    for name, mod in module.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            out.append(Target(name, mod.in_features, mod.out_features, False))
        elif conv1d is not None and isinstance(mod, conv1d):
            i, o = mod.weight.shape
            out.append(Target(name, int(i), int(o), True))
    return out


def _name_matches(name: str, pattern: str) -> bool:
    """A glob against the module name or the weight name; a plain name (no glob characters)
    also matches as a dotted suffix, as PEFT's ``target_modules=["c_attn"]`` does."""
    if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name + ".weight", pattern):
        return True
    plain = not any(c in pattern for c in "*?[")
    if plain and pattern.endswith(".weight"):
        pattern = pattern[: -len(".weight")]
    return plain and (name == pattern or name.endswith("." + pattern))


def targets_of(target: Any, targets: TargetSpec, *, fan_in_fan_out=False) -> tuple[Target, ...]:
    """The :class:`Target` s of ``target`` (Params of any tree form such as a flat
    ``named_parameters()`` dict, an ``nn.Module``, or :func:`aam_func.nn.functionalize`'s result) that ``targets`` selects: globs / plain names, or a predicate over weight
    names (``"blocks.0.attn.qkv.weight"``). Selecting nothing is a ``ValueError`` that lists the
    available names. ``fan_in_fan_out`` (Params only: True or globs) marks (in, out) weights."""
    from ..nn import Functional

    if isinstance(target, Functional):  # nn.functionalize(module): its module says which layers are linear
        target = target.apply.module
    if isinstance(target, nn.Module):
        cands = module_candidates(target)
        what = f"{type(target).__name__} (nn.Linear / Conv1D submodules)"
    elif isinstance(target, Tensor) or not any(isinstance(x, Tensor) for x in flatten(target).values()):
        raise TypeError(f"LoRA target must be Params or a torch.nn.Module (Params: a tree of tensors of any form), got {type(target).__name__}")
    else:
        cands = _params_candidates(target, fan_in_fan_out)
        what = "params (2-D *.weight leaves)"
    if callable(targets) and not isinstance(targets, (str, Mapping)):
        chosen = [t for t in cands if targets(t.name + ".weight")]
        desc = "the targets predicate"
    else:
        pats = [targets] if isinstance(targets, str) else list(targets)
        if not pats or not all(isinstance(p, str) for p in pats):
            raise TypeError(f"targets must be a glob, a list of globs or a predicate over weight names, got {targets!r}")
        chosen = [t for t in cands if any(_name_matches(t.name, p) for p in pats)]
        unmatched = [p for p in pats if not any(_name_matches(t.name, p) for t in cands)]
        if unmatched and chosen:
            raise ValueError(
                f"LoRA target pattern(s) {unmatched} match no weight of the {what}; available: "
                + ", ".join(t.name for t in cands)
            )
        desc = f"targets {pats}"
    if not chosen:
        raise ValueError(f"{desc} match no weight of the {what}; available: " + ", ".join(t.name for t in cands))
    return tuple(chosen)
