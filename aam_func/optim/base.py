"""The core protocol: a gradient transformation is a pair of pure functions.

``init(params) -> state`` and ``update(grads, state, params=None) -> (updates, state)``.
``updates`` is a tree shaped like ``grads``; :func:`apply_updates` adds it to ``params`` out of
place. ``state`` is a Params tree too (nested dicts whose leaves are tensors; step counters are
0-d int64 tensors), so it saves and loads with :func:`aam_func.tree.save` / ``load``.

Transformations never write into their inputs: new state buffers are freshly allocated, and the
in-place ``_foreach_*_`` calls inside only touch buffers the same call has just created.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import tree
from ..checks import ArgumentTypeError, check_number, is_number
from . import foreach

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "chain",
    "identity",
    "set_to_zero",
    "global_norm",
]


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``."""

    init: Callable[[Mapping], dict]
    update: Callable[..., tuple[dict, dict]]


# ----------------------------------------------------------------------------- tree plumbing


class Names(list):
    """The dotted names of a tree's tensor leaves (``None`` leaves left out), remembering the
    tree's structure so that :func:`build` returns the same form: a list stays a list, a flat
    ``named_parameters()`` dict a flat dict, a ``None`` leaf ``None``."""

    __slots__ = ("spec", "positions", "size")


def leaves_of(t: Any, what: str = "grads") -> tuple[Names, list[Tensor]]:
    """Dotted names and tensor leaves of any tree, in flatten order; ``None`` leaves are skipped
    (and come back as ``None`` from :func:`build`). Another leaf is a ``TypeError`` naming it."""
    if t is None:
        raise ValueError(f"{what} is required by this transformation but was None")
    all_names, all_leaves, spec = tree.paths(t)
    positions = [i for i, x in enumerate(all_leaves) if x is not None]
    for i in positions:
        if not isinstance(all_leaves[i], Tensor):
            raise TypeError(f"{what} leaf {all_names[i]!r} must be a Tensor or None, "
                            f"got {type(all_leaves[i]).__name__}: {all_leaves[i]!r}")
    names = Names(all_names[i] for i in positions)
    names.spec, names.positions, names.size = spec, positions, len(all_leaves)
    return names, [all_leaves[i] for i in positions]


def aligned(names: list[str], t: Any, what: str, ref: str = "grads", like: list[Tensor] | None = None,
            same_dtype: bool = False, allow_none: bool = False) -> list[Any]:
    """The tensor leaves of ``t`` in the order of ``names`` (matched by dotted name, so a state
    loaded back as nested dicts still fits a list's names). A ``ValueError`` lists any name
    difference; with ``like`` (``ref``'s leaves) every leaf must have its shape (and with
    ``same_dtype`` its dtype): checked here, before any kernel runs, with the leaf named.
    ``allow_none``: ``t`` may hold ``None`` for a name (returned as ``None``)."""
    if t is None:
        raise ValueError(f"{what} is required by this transformation but was None")
    wanted = set(names) if allow_none else ()
    flat = {n: x for n, x in tree.flatten(t).items() if x is not None or n in wanted}
    if list(flat.keys()) == list(names):
        out = list(flat.values())
    else:
        only_ref = [n for n in names if n not in flat]
        only_t = [n for n in flat if n not in set(names)]
        if only_ref or only_t:
            parts = []
            if only_ref:
                parts.append(f"only in {ref}: " + ", ".join(only_ref))
            if only_t:
                parts.append(f"only in {what}: " + ", ".join(only_t))
            raise ValueError(f"{what} and {ref} have different keys; " + "; ".join(parts))
        out = [flat[n] for n in names]
    for i, x in enumerate(out):
        if x is None and allow_none:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} leaf {names[i]!r} must be a Tensor, got {type(x).__name__}: {x!r}")
    if like is not None:
        for n, x, r in zip(names, out, like):
            if x is None:
                continue
            if x.shape != r.shape:
                raise ValueError(f"{what} leaf {n!r} has shape {tuple(x.shape)} but {ref} has {tuple(r.shape)}")
            if same_dtype and x.dtype != r.dtype:
                raise ValueError(f"{what} leaf {n!r} has dtype {x.dtype} but {ref} has {r.dtype}")
    return out


def build(names: list[str], values: list[Any]) -> Any:
    """A tree of ``values`` named ``names``: :func:`leaves_of`'s form when ``names`` came from it,
    else nested dicts split at the dots."""
    if isinstance(names, Names):
        full: list[Any] = [None] * names.size
        for i, v in zip(names.positions, values):
            full[i] = v
        return tree.rebuild(full, names.spec)
    return tree.unflatten(dict(zip(names, values)))


def substate(state: Mapping, key: str) -> dict:
    """``state[key]``, or ``{}`` when it is missing: an empty sub-state does not survive a
    safetensors round trip (a file stores leaves only), so combinators tolerate its absence."""
    return state.get(key, {}) if isinstance(state, Mapping) else {}


def entry(state: Any, key: str, what: str) -> Any:
    """``state[key]``, or a ValueError saying that ``state`` is not this transformation's state."""
    if not isinstance(state, Mapping) or key not in state:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{what} has no {key!r} entry (got {got}); build the state with this "
                         "transformation's init(params)")
    return state[key]


def step_counter() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def eager() -> bool:
    """Plain eager execution: Python may branch on a tensor's value (no compile, no vmap)."""
    return foreach.use_foreach() and not torch.compiler.is_compiling()


def tree_where(pred: Tensor, a: Any, b: Any) -> Any:
    """Leafwise ``torch.where(pred, a, b)`` over two trees of the same structure."""
    names, la = leaves_of(a, "tree_where's first tree")
    lb = aligned(names, b, "tree_where's second tree", "its first tree", like=la)
    return build(names, [torch.where(pred, x, y) for x, y in zip(la, lb)])


def cond(pred: Tensor, true_fn: Callable[[], Any], false_fn: Callable[[], Any]):
    """``true_fn()`` if ``pred`` else ``false_fn()``; both return ``(updates, state)``.

    Eager: a Python branch (only one side runs). Under ``torch.compile`` or ``vmap`` both sides
    run and the result is selected leafwise with ``torch.where`` (no graph break, per-member
    choice under vmap).
    """
    if eager() and pred.dim() == 0:
        return true_fn() if bool(pred) else false_fn()
    (ua, sa), (ub, sb) = true_fn(), false_fn()
    return tree_where(pred, ua, ub), tree_where(pred, sa, sb)


# ----------------------------------------------------------------------------- validation


def check_nonneg(name: str, value, allow_schedule: bool = False) -> None:
    if callable(value) and not isinstance(value, Tensor):
        if allow_schedule:
            return
        raise TypeError(f"{name} must be a number, got a callable {value!r}")
    if isinstance(value, Tensor):
        return  # injected/scheduled values are tensors; checking them would sync or break graphs
    if not is_number(value):
        raise ArgumentTypeError(f"{name} must be a float{' or a schedule' if allow_schedule else ''}, got {value!r}")
    check_number(name, value, min=0)


def check_beta(name: str, value) -> None:
    if isinstance(value, Tensor):
        return
    check_number(name, value, min=0, max=1, max_open=True)


def check_transform(name: str, t) -> None:
    if not isinstance(t, GradientTransformation):
        raise TypeError(f"{name} must be a GradientTransformation, got {type(t).__name__}: {t!r}")


# ----------------------------------------------------------------------------- core API


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leafwise, out of place, each result in its parameter's dtype and
    ``params``' form (any tree). A ``None`` update leaves its parameter as it is; an update of
    another shape (a ``(1,)`` update would broadcast) is an error naming the leaf.
    """
    names, ps = leaves_of(params, "params")
    us = aligned(names, updates, "updates", "params", like=ps, allow_none=True)
    idx = [i for i, u in enumerate(us) if u is not None]
    same = [i for i in idx if us[i].dtype == ps[i].dtype]
    out = list(ps)
    if same:
        for i, v in zip(same, foreach.add([ps[i] for i in same], [us[i] for i in same])):
            out[i] = v
    for i in idx:
        if us[i].dtype != ps[i].dtype:
            out[i] = (ps[i] + us[i].to(ps[i].dtype)).to(ps[i].dtype)
    return build(names, out)


def identity() -> GradientTransformation:
    """``u = g``; no state."""
    return GradientTransformation(lambda params: {}, lambda grads, state, params=None: (grads, state))


def set_to_zero() -> GradientTransformation:
    """``u = 0``; no state (used by :func:`freeze`)."""

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        return build(names, foreach.zeros_like(gs)), state

    return GradientTransformation(lambda params: {}, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose left to right: ``u = t_n(...t_2(t_1(g)))``; state ``{"0": s_1, "1": s_2, ...}``."""
    for i, t in enumerate(transforms):
        check_transform(f"chain argument {i}", t)

    def init(params):
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    def update(grads, state, params=None):
        new_state = {}
        for i, t in enumerate(transforms):
            grads, new_state[str(i)] = t.update(grads, substate(state, str(i)), params)
        return grads, new_state

    return GradientTransformation(init, update)


def global_norm(grads: Any) -> Tensor:
    """``sqrt(sum over leaves of ||g||_2^2)`` as a 0-d tensor (what clip_by_global_norm clips)."""
    return foreach.global_norm(leaves_of(grads)[1])
