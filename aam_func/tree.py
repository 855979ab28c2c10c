"""Params utilities: a model's parameters are a nested ``dict[str, Tensor | Params]``.

Flattened with dots, a Params tree is exactly a ``state_dict`` (``"blocks.0.attn.qkv.weight"``),
so the same names serve ``torch.func.functional_call``, safetensors files and weight import.
Every function here is pure: it returns new dicts and never writes into a tensor.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

Params = dict[str, Union[Tensor, "Params"]]
SEP = "."

__all__ = [
    "Params",
    "flatten",
    "unflatten",
    "unflatten_like",
    "map",
    "leaves",
    "names",
    "count",
    "partition",
    "merge",
    "select",
    "cast",
    "to",
    "zeros_like",
    "check_structure",
    "structure_diff",
    "save",
    "load",
]


def _is_tree(x: Any) -> bool:
    return isinstance(x, Mapping)


def flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested Params -> ``{"a.b.weight": tensor}`` in insertion order (state_dict names)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str) or key == "" or SEP in key:
            raise ValueError(
                f"Params keys must be non-empty strings without '{SEP}', got {key!r} under {prefix or 'the root'!r}"
            )
        name = f"{prefix}{SEP}{key}" if prefix else key
        if _is_tree(value):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> Params:
    """``{"a.b.weight": t}`` -> ``{"a": {"b": {"weight": t}}}``; inverse of :func:`flatten`."""
    root: dict = {}
    for name, value in flat.items():
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


def unflatten_like(template: Mapping, flat: Mapping[str, Any]) -> Params:
    """``flat`` (dotted names) in ``template``'s nesting, empty sub-dicts included (which
    :func:`unflatten` cannot know of). A name of ``template`` missing from ``flat`` is a KeyError;
    callers that want every difference listed check with :func:`structure_diff` first."""

    def build(node: Mapping, prefix: str) -> dict:
        out = {}
        for k, v in node.items():
            name = f"{prefix}{SEP}{k}" if prefix else k
            out[k] = build(v, name) if _is_tree(v) else flat[name]
        return out

    return build(template, "")


def structure_diff(expected: Mapping, got: Mapping, *, check_shapes: bool = True) -> list[str]:
    """Human-readable differences between two trees: missing, unexpected and mis-shaped leaves."""
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


def _shape(x: Any):
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list, torch.Size)):
        return tuple(x)
    return None


def check_structure(expected: Mapping, got: Mapping, *, what: str = "params", check_shapes: bool = True) -> None:
    """Raise one ``ValueError`` listing every missing, unexpected and mis-shaped leaf of ``got``."""
    problems = structure_diff(expected, got, check_shapes=check_shapes)
    if problems:
        raise ValueError(f"{what} do not match the expected structure; " + "; ".join(problems))


def map(fn: Callable[..., Any], tree: Mapping, *rest: Mapping, names: bool = False) -> Params:
    """Apply ``fn`` leafwise over one or more trees of the same structure.

    With ``names=True`` the dotted name is passed first: ``fn(name, leaf, *other_leaves)``.
    Leaves that are ``None`` are kept as ``None`` without calling ``fn``.
    """
    for i, other in enumerate(rest):
        problems = structure_diff(tree, other, check_shapes=False)
        if problems:
            raise ValueError(f"tree.map: tree {i + 1} does not match tree 0; " + "; ".join(problems))
    flat = flatten(tree)
    others = [flatten(o) for o in rest]
    out = {}
    for name, leaf in flat.items():
        if leaf is None:
            out[name] = None
            continue
        args = [leaf] + [o[name] for o in others]
        out[name] = fn(name, *args) if names else fn(*args)
    return unflatten(out)


def leaves(tree: Mapping) -> list[Any]:
    """The leaves in flatten order."""
    return list(flatten(tree).values())


def names(tree: Mapping) -> list[str]:
    """The dotted names in flatten order."""
    return list(flatten(tree).keys())


def count(tree: Mapping) -> int:
    """Total number of scalar elements over all tensor leaves."""
    return sum(int(x.numel()) for x in leaves(tree) if isinstance(x, Tensor))


Selector = Union[str, Iterable[str], Callable[[str, Any], bool], Mapping]


def _selector(select: Selector) -> Callable[[str, Any], bool]:
    """A predicate on (name, leaf) from globs, a predicate, or a tree of bools."""
    if callable(select) and not isinstance(select, Mapping):
        return select
    if isinstance(select, Mapping):
        flat = flatten(select)

        def pred(name, leaf):
            if name not in flat:
                raise ValueError(f"mask tree has no entry for {name!r}")
            return bool(flat[name])

        return pred
    patterns = [select] if isinstance(select, str) else list(select)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"select must be a glob, a list of globs, a predicate or a tree of bools, got {select!r}")
    return lambda name, leaf: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(tree: Mapping, select: Selector) -> Params:
    """A tree of bools: which leaves ``select`` picks (a mask for optimizers and partition)."""
    pred = _selector(select)
    return unflatten({n: pred(n, x) for n, x in flatten(tree).items()})


def partition(tree: Mapping, select: Selector, *, require_match: bool = False) -> tuple[Params, Params]:
    """Split into ``(selected, rest)`` by a predicate ``(name, leaf) -> bool``, globs or a bool tree.

    ``merge(selected, rest)`` restores the tree. With ``require_match`` an empty selection is an
    error that lists the available names.
    """
    pred = _selector(select)
    chosen, rest = {}, {}
    for name, leaf in flatten(tree).items():
        (chosen if pred(name, leaf) else rest)[name] = leaf
    if require_match and not chosen:
        raise ValueError(f"selection {select!r} matches no parameter; available: {', '.join(flatten(tree))}")
    return unflatten(chosen), unflatten(rest)


def merge(*trees: Mapping) -> Params:
    """Union of trees with disjoint leaves (inverse of :func:`partition`); overlap is an error."""
    out: dict[str, Any] = {}
    for t in trees:
        for name, leaf in flatten(t).items():
            if name in out:
                raise ValueError(f"merge: leaf {name!r} is present in more than one tree")
            out[name] = leaf
    return unflatten(out)


def cast(tree: Mapping, dtype: torch.dtype, *, only_floating: bool = True) -> Params:
    """Cast floating-point leaves (all leaves with ``only_floating=False``) to ``dtype``."""
    return map(lambda x: x.to(dtype) if (x.is_floating_point() or not only_floating) else x, tree)


def to(tree: Mapping, *args, **kwargs) -> Params:
    """``Tensor.to`` on every leaf (device, dtype, non_blocking ...)."""
    return map(lambda x: x.to(*args, **kwargs), tree)


def zeros_like(tree: Mapping, dtype: torch.dtype | None = None) -> Params:
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def save(tree: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a tree as a safetensors file, atomically: a temp file in the same folder, then rename.

    A crash mid-write leaves any previous file at ``path`` intact.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in flatten(tree).items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(
    path: str | os.PathLike,
    like: Mapping | None = None,
    *,
    device: str | torch.device = "cpu",
    with_metadata: bool = False,
):
    """Read a safetensors file into a nested tree.

    With ``like`` (a tree of tensors or shapes) the file is validated: every missing, unexpected
    and mis-shaped key is listed in one ``ValueError``, and dtypes follow ``like``'s tensors.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no params file at {path!r}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            flat = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read params file {path!r}: {e}") from e
    tree = unflatten(flat)
    if like is not None:
        check_structure(like, tree, what=f"params in {path!r}")
        fl, ft = flatten(like), flatten(tree)
        # like's order (safetensors stores keys sorted) and like's dtypes
        tree = unflatten({k: (ft[k].to(fl[k].dtype) if isinstance(fl[k], Tensor) else ft[k]) for k in fl})
    return (tree, metadata) if with_metadata else tree
