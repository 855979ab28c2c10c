"""Leafwise maps, selections by dotted-name globs, and partition/merge, over any pytree.

Every function returns the structure it was given. :func:`subset` (and so :func:`partition`)
keeps a tree's form: dicts drop the keys not kept (as before), sequences, namedtuples and
dataclasses keep their positions with ``None`` in place of a dropped leaf, so names never shift
and :func:`merge` puts the parts back together.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .paths import SEP, _part, flatten, is_leaf, paths, rebuild, structure_diff

__all__ = ["map", "select", "selector", "subset", "partition", "merge", "cast", "to", "zeros_like"]


def map(fn: Callable[..., Any], tree: Any, *rest: Any, names: bool = False) -> Any:
    """Apply ``fn`` leafwise over one or more trees with the same leaf names; the result has
    ``tree``'s structure. With ``names=True`` the dotted name is passed first:
    ``fn(name, leaf, *other_leaves)``. ``None`` leaves of ``tree`` stay ``None`` (``fn`` is not called).
    """
    for i, other in enumerate(rest):
        problems = structure_diff(tree, other, check_shapes=False)
        if problems:
            raise ValueError(f"tree.map: tree {i + 1} does not match tree 0; " + "; ".join(problems))
    ns, ls, spec = paths(tree)
    others = [flatten(o) for o in rest]
    out = []
    for name, leaf in zip(ns, ls):
        if leaf is None:
            out.append(None)
            continue
        args = [leaf] + [o[name] for o in others]
        out.append(fn(name, *args) if names else fn(*args))
    return rebuild(out, spec)


Selector = Union[str, Iterable[str], Callable[[str, Any], bool], Any]


def _is_globs(select: Any) -> bool:
    return isinstance(select, str) or (
        isinstance(select, (list, tuple)) and type(select) in (list, tuple) and len(select) > 0
        and all(isinstance(p, str) for p in select))


def selector(select: Selector) -> Callable[[str, Any], bool]:
    """A predicate on ``(name, leaf)`` from a glob or list of globs on dotted names, a predicate,
    or a tree of bools (any form: its leaf names are looked up)."""
    if _is_globs(select):
        patterns = [select] if isinstance(select, str) else list(select)
        return lambda name, leaf: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if callable(select) and pytree._get_node_type(select) not in pytree.SUPPORTED_NODES:
        return select
    if isinstance(select, (list, tuple)) and not select:
        raise TypeError("select must be a glob, a list of globs, a predicate or a tree of bools, got an empty list")
    flat = flatten(select)
    if not flat or not all(v is None or isinstance(v, (bool, Tensor)) for v in flat.values()):
        raise TypeError(f"select must be a glob, a list of globs, a predicate or a tree of bools, got {select!r}")

    def pred(name, leaf):
        if name not in flat:
            raise ValueError(f"mask tree has no entry for {name!r}")
        return bool(flat[name])

    return pred


def select(tree: Any, select: Selector) -> Any:
    """A tree of bools in ``tree``'s structure: which leaves ``select`` picks (a mask for
    optimizers and partition). ``None`` leaves stay ``None``."""
    pred = selector(select)
    return map(lambda name, x: bool(pred(name, x)), tree, names=True)


_DROP = object()


def _prune(node: Any) -> Any:
    """Remove ``_DROP`` leaves: from dicts (and dicts emptied by it), else replaced by None."""
    if node is _DROP:
        return _DROP
    if is_leaf(node) or pytree._get_node_type(node) not in pytree.SUPPORTED_NODES:
        return node
    if isinstance(node, dict):
        out = defaultdict(node.default_factory) if isinstance(node, defaultdict) else type(node)()
        for k, v in node.items():
            pv = _prune(v)
            if pv is _DROP or (isinstance(pv, dict) and not pv and isinstance(v, dict) and v):
                continue
            out[k] = pv
        return out
    children, spec = pytree.tree_flatten(node, is_leaf=lambda y: y is not node)
    kids = [_prune(c) for c in children]
    return pytree.tree_unflatten([None if c is _DROP else c for c in kids], spec)


def subset(tree: Any, keep: Callable[[str, Any], bool] | Iterable[str]) -> Any:
    """``tree`` with only the leaves ``keep`` picks (a predicate on ``(name, leaf)`` or a set of
    names), in ``tree``'s form: dicts lose the other keys, sequences/namedtuples/dataclasses
    hold ``None`` in their place."""
    if not callable(keep):
        wanted = set(keep)
        keep = lambda name, leaf: name in wanted  # noqa: E731
    ns, ls, spec = paths(tree)
    marked = [leaf if keep(n, leaf) else _DROP for n, leaf in zip(ns, ls)]
    out = _prune(rebuild(marked, spec))
    return None if out is _DROP else out


def partition(tree: Any, select: Selector, *, require_match: bool = False) -> tuple[Any, Any]:
    """Split into ``(selected, rest)`` (each by :func:`subset`, in ``tree``'s form) by a predicate
    ``(name, leaf) -> bool``, globs or a bool tree; ``merge(selected, rest)`` restores the tree.
    With ``require_match`` an empty selection is an error that lists the available names."""
    pred = selector(select)
    chosen = {n for n, x in flatten(tree).items() if x is not None and pred(n, x)}
    if require_match and not chosen:
        raise ValueError(f"selection {select!r} matches no parameter; available: {', '.join(flatten(tree))}")
    return subset(tree, chosen), subset(tree, lambda n, x: n not in chosen)


def _merge2(a: Any, b: Any, where: str) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    a_node = not is_leaf(a) and pytree._get_node_type(a) in pytree.SUPPORTED_NODES
    b_node = not is_leaf(b) and pytree._get_node_type(b) in pytree.SUPPORTED_NODES
    if not (a_node and b_node):
        raise ValueError(f"merge: leaf {where or '<root>'!r} is present in more than one tree")
    if isinstance(a, dict) and isinstance(b, dict):
        out = a.copy()
        for k, v in b.items():
            name = f"{where}{SEP}{k}" if where else str(k)
            out[k] = _merge2(a[k], v, name) if k in a else v
        return out
    ca, sa = pytree.tree_flatten_with_path(a, is_leaf=lambda y: y is not a)
    cb, sb = pytree.tree_flatten_with_path(b, is_leaf=lambda y: y is not b)
    ka = {_part(path[0], where): x for path, x in ca}
    kb = {_part(path[0], where): x for path, x in cb}
    if len(ka) < len(kb):  # a dataclass keeps its None fields out of its children
        (ka, kb), (ca, sa) = (kb, ka), (cb, sb)
    if type(a) is not type(b) or not set(kb) <= set(ka):
        raise ValueError(f"merge: {where or 'the root'!r} is a {type(a).__name__} with {sorted(ka)} in one tree "
                         f"and a {type(b).__name__} with {sorted(kb)} in another")
    kids = [_merge2(x, kb.get(k), f"{where}{SEP}{k}" if where else k) for k, x in ka.items()]
    return pytree.tree_unflatten(kids, sa)


def merge(*trees: Any) -> Any:
    """Union of trees with disjoint leaves (inverse of :func:`partition`): dicts are joined key by
    key, other nodes position by position (a ``None`` gives way to the other tree's leaf); a
    leaf present in two trees is an error."""
    if not trees:
        return {}
    out = trees[0]
    for t in trees[1:]:
        out = _merge2(out, t, "")
    return out


def cast(tree: Any, dtype: torch.dtype, *, only_floating: bool = True) -> Any:
    """Cast floating-point leaves (all leaves with ``only_floating=False``) to ``dtype``."""
    return map(lambda x: x.to(dtype) if (x.is_floating_point() or not only_floating) else x, tree)


def to(tree: Any, *args, **kwargs) -> Any:
    """``Tensor.to`` on every leaf (device, dtype, non_blocking ...)."""
    return map(lambda x: x.to(*args, **kwargs), tree)


def zeros_like(tree: Any, dtype: torch.dtype | None = None) -> Any:
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)

