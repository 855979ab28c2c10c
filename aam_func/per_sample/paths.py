"""Params as any pytree for per-example work (``torch.utils._pytree``, the registry
``torch.func`` itself uses): nested dicts, flat ``named_parameters()`` dicts with dotted keys,
lists, tuples, namedtuples, registered dataclasses, and ``None`` leaves (no parameter: left out
of the transforms, ``None`` again in every result).

Each tensor leaf gets a dotted name: dict keys and sequence indices joined by ``.``
(``{"blocks": [{"w": ...}]}`` -> ``"blocks.0.w"``; ``{"0.weight": ...}`` -> ``"0.weight"``), the
state_dict spelling. Where two leaves would get one name (``{"a.b": x, "a": {"b": y}}``) every
leaf is named by ``pytree.keystr`` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["leaf_names", "named_leaves", "check_params", "flat_problem"]


def _part(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(params) -> list[str]:
    """The dotted names of the leaves of ``params``, in ``tree_leaves`` order."""
    paths = [p for p, _ in pytree.tree_flatten_with_path(params)[0]]
    names = [".".join(_part(k) for k in p) or "<root>" for p in paths]
    if len(set(names)) != len(names):
        names = [pytree.keystr(p) or "<root>" for p in paths]
    return names


def check_params(params) -> None:
    """Every leaf a tensor or None; a clear error naming the path."""
    for name, v in zip(leaf_names(params), pytree.tree_leaves(params)):
        if v is not None and not isinstance(v, Tensor):
            raise TypeError(f"params leaf {name!r} is a {type(v).__name__}, expected a tensor (or None)")


def named_leaves(params) -> tuple[dict[str, Tensor], Callable[[dict], object]]:
    """``({dotted name: leaf}, rebuild)``: ``rebuild(d)`` puts ``d[name]`` back in each leaf's place."""
    leaves, spec = pytree.tree_flatten(params)
    names = leaf_names(params)
    return dict(zip(names, leaves)), lambda d: pytree.tree_unflatten([d[n] for n in names], spec)


def flat_problem(loss_fn: Callable, params):
    """``(flat, flat_loss, restore)``: the tensor leaves of any params pytree as one
    ``{dotted name: tensor}`` dict (``None`` leaves left out: transforms take tensors only), the
    loss on that dict (the caller's structure rebuilt around the same tensor objects, so uses are
    still found by identity), and ``restore(d)`` giving ``d``'s values back in the caller's
    structure with ``None`` where ``params`` had it."""
    check_params(params)
    leaves, spec = pytree.tree_flatten(params)
    names = leaf_names(params)
    flat = {n: v for n, v in zip(names, leaves) if v is not None}

    def rebuild(d):
        return pytree.tree_unflatten([None if v is None else d[n] for n, v in zip(names, leaves)], spec)

    def flat_loss(p, batch):
        return loss_fn(rebuild(p), batch)

    return flat, flat_loss, rebuild
