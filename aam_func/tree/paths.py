"""Naming the leaves of any pytree by dotted paths, and rebuilding trees from those names.

A tree is anything ``torch.utils._pytree`` (the registry ``torch.func`` itself uses) flattens:
dicts (any key order, nested or flat ``named_parameters()`` dicts with dotted keys), lists,
tuples, namedtuples, registered dataclasses. ``None`` and shapes (``torch.Size``, a tuple of ints)
are leaves: a tree of shapes describes a tree of tensors. A leaf's name joins its path's parts with dots: a dict key,
a sequence index, a field name. So a nested dict's names are exactly its ``state_dict`` names,
and a flat ``named_parameters()`` dict keeps its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

SEP = "."

__all__ = ["SEP", "Flat", "is_leaf", "paths", "rebuild", "DictSpec", "flatten", "unflatten", "unflatten_like", "leaves", "names", "count",
           "structure_diff", "check_structure"]


def is_leaf(x: Any) -> bool:
    """What aam_func treats as a leaf beyond pytree's own: ``None`` and shapes (a ``torch.Size``
    or a plain tuple of ints, ``()`` included: a tree of shapes describes a tree of tensors)."""
    return x is None or isinstance(x, torch.Size) or (
        type(x) is tuple and all(isinstance(i, int) and not isinstance(i, bool) for i in x))


def _part(key: Any, where: str) -> str:
    if isinstance(key, pytree.MappingKey):
        k = key.key
        if isinstance(k, str):
            if k == "":
                raise ValueError(f"tree keys must be non-empty strings, got '' under {where or 'the root'!r}")
            return k
        if isinstance(k, int) and not isinstance(k, bool):
            return str(k)
        raise ValueError(f"tree keys must be strings or ints, got {k!r} under {where or 'the root'!r}")
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key)


class DictSpec:
    """The structure of a tree of plain dicts with string keys (aam_func's own Params, a flat
    ``named_parameters()`` dict): the fast path of :func:`paths` (a plain recursion, several
    times faster than pytree's generic walk on the optimizer's hot path)."""

    __slots__ = ("template",)

    def __init__(self, template: dict):
        self.template = template

    def unflatten(self, leaves: list) -> dict:
        it = iter(leaves)

        def build(node: dict) -> dict:
            return {k: build(v) if type(v) is dict else next(it) for k, v in node.items()}

        return build(self.template)


def rebuild(leaves: list, spec: Any) -> Any:
    """The tree of ``spec`` (from :func:`paths`) with ``leaves`` in flatten order."""
    if isinstance(spec, DictSpec):
        return spec.unflatten(leaves)
    return pytree.tree_unflatten(leaves, spec)


def _dict_paths(node: dict, prefix: str, names: list, leaves: list):
    """Names and leaves of plain dicts with non-empty str keys (leaves: anything that is not a
    pytree node), and the skeleton (the same dicts, ``None`` for each leaf: no tensor is kept
    alive by a spec); None as soon as another node or key appears."""
    skeleton = {}
    for k, v in node.items():
        if type(k) is not str or k == "":
            return None
        name = f"{prefix}{SEP}{k}" if prefix else k
        if type(v) is dict:
            sub = _dict_paths(v, name, names, leaves)
            if sub is None:
                return None
            skeleton[k] = sub
        elif isinstance(v, Tensor) or is_leaf(v) or pytree._get_node_type(v) not in pytree.SUPPORTED_NODES:
            names.append(name)
            leaves.append(v)
            skeleton[k] = None
        else:  # a list, tuple, namedtuple, dict subclass ... inside: the generic walk
            return None
    return skeleton


def _duplicates(out_names: list[str]) -> None:
    if len(set(out_names)) != len(out_names):
        seen, dup = set(), []
        for n in out_names:
            if n in seen and n not in dup:
                dup.append(n)
            seen.add(n)
        raise ValueError(f"tree has several leaves named {', '.join(map(repr, dup))} (a dotted key and a nested "
                         "path that spell the same name); rename one")


def paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, spec)`` of any pytree: dotted names and leaves in flatten order, and the
    structure (``rebuild(leaves, spec)`` gives the tree back). Two leaves with the same name
    (``{"a.b": x, "a": {"b": y}}``) are an error."""
    if type(tree) is dict:
        out_names: list[str] = []
        out_leaves: list[Any] = []
        skeleton = _dict_paths(tree, "", out_names, out_leaves)
        if skeleton is not None:
            _duplicates(out_names)
            return out_names, out_leaves, DictSpec(skeleton)
    pairs, spec = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out_names, out_leaves = [], []
    for path, leaf in pairs:
        parts: list[str] = []
        for key in path:
            parts.append(_part(key, SEP.join(parts)))
        out_names.append(SEP.join(parts))
        out_leaves.append(leaf)
    _duplicates(out_names)
    return out_names, out_leaves, spec


class Flat(dict):
    """:func:`flatten`'s result: ``{dotted name: leaf}`` that remembers the tree's structure, so
    :func:`unflatten` gives back the very form it came from (list, namedtuple, flat dict ...)
    as long as its keys are unchanged (values may be replaced)."""

    __slots__ = ("spec", "order")


# a Flat is itself a tree (a dict node; it unflattens to a plain dict), so it can be passed on
pytree.register_pytree_node(
    Flat,
    lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: dict(zip(keys, values)),
    serialized_type_name="aam_func.tree.Flat",
    flatten_with_keys_fn=lambda d: ([(pytree.MappingKey(k), v) for k, v in d.items()], list(d.keys())),
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Any tree -> ``{"a.b.weight": leaf}`` in flatten order (``state_dict`` names for dicts)."""
    ns, ls, spec = paths(tree)
    if prefix:
        ns = [f"{prefix}{SEP}{n}" if n else prefix for n in ns]
    out = Flat(zip(ns, ls))
    out.spec, out.order = spec, tuple(ns)
    return out


def _nest(flat: Mapping[str, Any]) -> dict:
    root: dict = {}
    for name, value in flat.items():
        if not isinstance(name, str):
            raise ValueError(f"flat names must be strings, got {name!r}")
        parts = name.split(SEP)
        if any(p == "" for p in parts):
            raise ValueError(f"flat name {name!r} has an empty component")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"flat names conflict: {SEP.join(parts[: i + 1])!r} is a leaf and also a prefix of {name!r}"
                )
            node = child
        if parts[-1] in node and isinstance(node[parts[-1]], dict):
            raise ValueError(f"flat names conflict: {name!r} is a leaf and also a prefix of other names")
        node[parts[-1]] = value
    return root


def unflatten(flat: Mapping[str, Any]) -> Any:
    """Inverse of :func:`flatten`: the original form when ``flat`` is flatten's result with the
    same keys; otherwise nested dicts split at the dots (``{"a.b": t}`` -> ``{"a": {"b": t}}``)."""
    spec = getattr(flat, "spec", None)
    if spec is not None and tuple(flat.keys()) == flat.order:
        return rebuild(list(flat.values()), spec)
    return _nest(flat)


def unflatten_like(template: Any, flat: Mapping[str, Any]) -> Any:
    """``flat`` (dotted names) in ``template``'s structure (any tree; empty sub-dicts included).
    A name of ``template`` missing from ``flat`` is a KeyError, except where ``template`` holds
    ``None`` (such a leaf stays ``None``); callers that want every difference listed check with
    :func:`structure_diff` first."""
    ns, ls, spec = paths(template)
    return rebuild([flat.get(n) if leaf is None else flat[n] for n, leaf in zip(ns, ls)], spec)


def leaves(tree: Any) -> list[Any]:
    """The leaves in flatten order (``None`` leaves included)."""
    return paths(tree)[1]


def names(tree: Any) -> list[str]:
    """The dotted names in flatten order."""
    return paths(tree)[0]


def count(tree: Any) -> int:
    """Total number of scalar elements over all tensor leaves."""
    return sum(int(x.numel()) for x in leaves(tree) if isinstance(x, Tensor))


def _shape(x: Any):
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, tuple):
        return tuple(x)
    return None


def structure_diff(expected: Any, got: Any, *, check_shapes: bool = True) -> list[str]:
    """Human-readable differences between two trees, by dotted name: missing, unexpected and
    mis-shaped leaves (leaves are tensors or shapes)."""
    fe, fg = flatten(expected), flatten(got)
    problems = []
    missing = [k for k in fe if k not in fg]
    unexpected = [k for k in fg if k not in fe]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if check_shapes:
        bad = []
        for k in fe:
            if k in fg:
                se, sg = _shape(fe[k]), _shape(fg[k])
                if se is not None and sg is not None and se != sg:
                    bad.append(f"{k} (expected {tuple(se)}, got {tuple(sg)})")
        if bad:
            problems.append("mis-shaped: " + ", ".join(bad))
    return problems


def check_structure(expected: Any, got: Any, *, what: str = "params", check_shapes: bool = True) -> None:
    """Raise one ``ValueError`` listing every missing, unexpected and mis-shaped leaf of ``got``."""
    problems = structure_diff(expected, got, check_shapes=check_shapes)
    if problems:
        raise ValueError(f"{what} do not match the expected structure; " + "; ".join(problems))
