"""Params as any pytree for per-example work, named by :func:`aam_func.tree.paths` (the one
owner of leaf names: dict keys, sequence indices and field names joined by ``.``, so a
``named_parameters()`` dict keeps its keys): nested dicts, flat dotted dicts, lists, tuples,
namedtuples, registered dataclasses, and ``None`` leaves (no parameter: left out of the
transforms, ``None`` again in every result).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .. import tree

__all__ = ["leaf_names", "named_leaves", "check_params", "flat_problem"]


def leaf_names(params) -> list[str]:
    """The dotted names of the leaves of ``params``, in flatten order."""
    return tree.paths(params)[0]


def check_params(params) -> None:
    """Every leaf a tensor or None; a clear error naming the path."""
    _check_leaves(*tree.paths(params)[:2])


def _check_leaves(names, leaves) -> None:
    for name, v in zip(names, leaves):
        if v is not None and not isinstance(v, Tensor):
            raise TypeError(f"params leaf {name!r} is a {type(v).__name__}, expected a tensor (or None)")


def named_leaves(params) -> tuple[dict[str, Tensor], Callable[[dict], object]]:
    """``({dotted name: leaf}, rebuild)``: ``rebuild(d)`` puts ``d[name]`` back in each leaf's place."""
    names, leaves, spec = tree.paths(params)
    return dict(zip(names, leaves)), lambda d: tree.rebuild([d[n] for n in names], spec)


def flat_problem(loss_fn: Callable, params):
    """``(flat, flat_loss, restore)``: the tensor leaves of any params pytree as one
    ``{dotted name: tensor}`` dict (``None`` leaves left out: transforms take tensors only), the
    loss on that dict (the caller's structure rebuilt around the same tensor objects, so uses are
    still found by identity), and ``restore(d)`` giving ``d``'s values back in the caller's
    structure with ``None`` where ``params`` had it."""
    names, leaves, spec = tree.paths(params)
    _check_leaves(names, leaves)
    flat = {n: v for n, v in zip(names, leaves) if v is not None}

    def restore(d):
        return tree.rebuild([None if v is None else d[n] for n, v in zip(names, leaves)], spec)

    def flat_loss(p, batch):
        return loss_fn(restore(p), batch)

    return flat, flat_loss, restore
