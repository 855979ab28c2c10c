"""Transformations of transformations: masks, partitions, accumulation, skipping, injection,
dynamic loss scaling, and the readers that pull logged values out of a state tree."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from numbers import Number

import torch
from torch import Tensor

from .. import tree
from ..checks import check_int, check_number
from . import foreach
from .base import (
    GradientTransformation,
    aligned,
    build,
    check_transform,
    cond,
    entry,
    leaves_of,
    set_to_zero,
    step_counter,
    substate,
)

__all__ = [
    "masked",
    "partition",
    "freeze",
    "multi_steps",
    "apply_if_finite",
    "inject_hyperparams",
    "dynamic_loss_scale",
    "unscale_grads",
    "update_loss_scale",
    "loss_scale",
    "scale_loss",
    "current_learning_rate",
    "last_global_norm",
]


def _selection(mask, t) -> dict[str, bool]:
    """``{name: selected}`` for the tensor leaves of ``t`` (any tree) from a bool tree of any
    form, a predicate or globs on dotted names."""
    try:
        pred = tree.selector(mask)
        return {n: bool(pred(n, x)) for n, x in tree.flatten(t).items() if x is not None}
    except ValueError as e:
        raise ValueError(f"mask does not cover the tree: {e}") from None


def _joined(grads, parts) -> object:
    """The updates of ``parts`` (trees of disjoint leaves) in ``grads``' form, by name."""
    names, gs = leaves_of(grads)
    merged = {}
    for part in parts:
        merged.update({n: x for n, x in tree.flatten(part).items() if x is not None})
    missing = [n for n in names if n not in merged]
    if missing:
        raise ValueError("inner transformations returned no update for: " + ", ".join(missing))
    return build(names, [merged[n] for n in names])


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """Apply ``inner`` to the selected leaves only; the others pass through unchanged.

    ``mask``: a tree of bools (any form), a predicate ``(name, leaf) -> bool`` or glob patterns on
    dotted names. ``inner`` sees (and keeps state for) the selected subtree only
    (:func:`aam_func.tree.subset`: dicts without the other keys, sequences with ``None`` there).
    State ``{"inner": inner_state}``.
    """
    check_transform("masked's inner", inner)

    def split(t, sel):
        return (tree.subset(t, lambda n, x: x is not None and sel[n]),
                tree.subset(t, lambda n, x: x is not None and not sel[n]))

    def init(params):
        sel = _selection(mask, params)
        return {"inner": inner.init(split(params, sel)[0])}

    def update(grads, state, params=None):
        sel = _selection(mask, grads)
        g_in, g_out = split(grads, sel)
        p_in = None if params is None else split(params, _selection(mask, params))[0]
        u_in, s_in = inner.update(g_in, substate(state, "inner"), p_in)
        return _joined(grads, [u_in, g_out]), {"inner": s_in}

    return GradientTransformation(init, update)


def partition(transforms: Mapping[str, GradientTransformation], labels) -> GradientTransformation:
    """A transformation per label: ``labels`` is a tree of label strings (any form, looked up by
    dotted name) or a function ``(name, leaf) -> label``; each leaf is updated by
    ``transforms[its label]``. State ``{label: state of that label's transformation}``."""
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(f"partition needs a non-empty dict label -> GradientTransformation, got {transforms!r}")
    for k, t in transforms.items():
        check_transform(f"partition's transforms[{k!r}]", t)

    def label_of(t):
        names = [n for n, x in tree.flatten(t).items() if x is not None]
        if callable(labels) and not isinstance(labels, Mapping):
            flat_t = tree.flatten(t)
            out = {n: labels(n, flat_t[n]) for n in names}
        else:
            flat = tree.flatten(labels)
            missing = [n for n in names if n not in flat]
            if missing:
                raise ValueError("partition labels have no entry for: " + ", ".join(missing))
            out = {n: flat[n] for n in names}
        bad = sorted({str(v) for v in out.values() if v not in transforms})
        if bad:
            raise ValueError(f"partition labels {bad} have no transformation; known labels: {sorted(transforms)}")
        return out

    def sub(t, lab, key):
        return tree.subset(t, lambda n, x: x is not None and lab[n] == key)

    def init(params):
        lab = label_of(params)
        return {k: t.init(sub(params, lab, k)) for k, t in transforms.items()}

    def update(grads, state, params=None):
        lab = label_of(grads)
        parts, new_state = [], {}
        for k, t in transforms.items():
            p = None if params is None else sub(params, lab, k)
            u, new_state[k] = t.update(sub(grads, lab, k), substate(state, k), p)
            parts.append(u)
        return _joined(grads, parts), new_state

    return GradientTransformation(init, update)


def freeze(mask) -> GradientTransformation:
    """Zero updates for the selected leaves; others pass through. Put it last in a chain (after
    the optimizer): a weight decay after it would still move the frozen params."""
    return masked(set_to_zero(), mask)


def multi_steps(inner: GradientTransformation, every_k: int, use_grad_mean: bool = True) -> GradientTransformation:
    """Gradient accumulation: sum ``k`` micro-batch gradients, then apply ``inner`` once to their
    mean (sum with ``use_grad_mean=False``); the ``k - 1`` steps in between emit zero updates and
    leave ``inner``'s state as it is. State ``{"mini_step": int64, "acc": tree, "inner": ...}``.

    With equal micro-batches and a mean loss, ``k`` micro steps equal one step on the
    concatenated batch (the mean of the micro gradients is the batch gradient).
    """
    check_transform("multi_steps' inner", inner)
    check_int("every_k", every_k, min=1)

    def init(params):
        names, ps = leaves_of(params, "params")
        return {"mini_step": step_counter(), "acc": build(names, foreach.zeros_like(ps)), "inner": inner.init(params)}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        acc = foreach.add(aligned(names, entry(state, "acc", "multi_steps state"), "multi_steps state 'acc'",
                                  like=gs, same_dtype=True), gs)
        mini = state["mini_step"] + 1
        emit = mini >= every_k
        inner_state = substate(state, "inner")

        def apply():
            total = foreach.mul(acc, 1.0 / every_k) if use_grad_mean else acc
            u, s = inner.update(build(names, total), inner_state, params)
            zeros = build(names, foreach.zeros_like(gs))
            return u, {"mini_step": torch.zeros_like(mini), "acc": zeros, "inner": s}

        def hold():
            zeros = build(names, foreach.zeros_like(gs))
            return zeros, {"mini_step": mini, "acc": build(names, acc), "inner": inner_state}

        return cond(emit, apply, hold)

    return GradientTransformation(init, update)


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int = 5) -> GradientTransformation:
    """Skip steps whose gradients hold an inf or NaN: the update is zero and ``inner``'s state is
    unchanged; ``notfinite_count`` counts consecutive skips and ``total_notfinite`` all skips.
    After more than ``max_consecutive_errors`` consecutive skips the step is applied anyway (as
    Optax), so a run that only produces non-finite gradients fails visibly.
    State ``{"notfinite_count", "total_notfinite": int64, "last_finite": bool, "inner": ...}``."""
    check_transform("apply_if_finite's inner", inner)
    check_int("max_consecutive_errors", max_consecutive_errors, min=0)

    def init(params):
        return {
            "notfinite_count": step_counter(),
            "total_notfinite": step_counter(),
            "last_finite": torch.ones((), dtype=torch.bool),
            "inner": inner.init(params),
        }

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        finite = foreach.all_finite(gs)
        count = torch.where(finite, torch.zeros_like(state["notfinite_count"]), state["notfinite_count"] + 1)
        total = state["total_notfinite"] + (~finite).to(torch.int64)
        counters = {"notfinite_count": count, "total_notfinite": total, "last_finite": finite}
        inner_state = substate(state, "inner")

        def step():
            u, s = inner.update(grads, inner_state, params)
            return u, {**counters, "inner": s}

        def skip():
            return build(names, foreach.zeros_like(gs)), {**counters, "inner": inner_state}

        return cond(finite | (count > max_consecutive_errors), step, skip)

    return GradientTransformation(init, update)


def inject_hyperparams(factory: Callable[..., GradientTransformation], static_args=("mask", "nesterov")):
    """Make a factory's numeric hyperparameters part of the state, so they can be scheduled,
    read and changed between steps without rebuilding the optimizer::

        opt = optim.inject_hyperparams(optim.adamw)(learning_rate=optim.warmup_cosine(3e-4, 100, 1000))
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        optim.current_learning_rate(state)   # == state["hyperparams"]["learning_rate"]

    Numbers and 0-d tensors become float64 0-d tensors in ``state["hyperparams"]``; callables
    (except ``static_args`` and bools) are schedules of the step count, re-evaluated each update.
    ``state["hyperparams"][name]`` holds the value used by the latest update (after ``init``: the
    value for the first step). To change one by hand, write a new value into a copy of the state.
    State ``{"count": int64, "hyperparams": {name: tensor}, "inner": ...}``.
    """
    if not callable(factory):
        raise TypeError(f"inject_hyperparams needs a factory of GradientTransformation, got {factory!r}")
    sig = inspect.signature(factory)
    static_args = set(static_args)

    def wrapped(*args, **kwargs) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        numeric, schedules, static = {}, {}, {}
        for name, value in bound.arguments.items():
            if name in static_args or isinstance(value, bool) or value is None:
                static[name] = value
            elif isinstance(value, Tensor) or (isinstance(value, Number)):
                numeric[name] = value
            elif callable(value):
                schedules[name] = value
            else:
                static[name] = value
        factory(**static, **numeric, **{k: 0.0 for k in schedules})  # validate eagerly

        def values_at(count, state_hp=None):
            hp = {k: foreach.as_scalar(v) for k, v in numeric.items()}
            if state_hp is not None:  # numeric values may have been edited in the state
                hp.update({k: state_hp[k] for k in numeric if k in state_hp})
            hp.update({k: foreach.as_scalar(s(count)) for k, s in schedules.items()})
            return hp

        def init(params):
            hp = values_at(step_counter())
            return {"count": step_counter(), "hyperparams": hp, "inner": factory(**static, **hp).init(params)}

        def update(grads, state, params=None):
            count = state["count"]
            hp = values_at(count, state.get("hyperparams"))
            u, s = factory(**static, **hp).update(grads, substate(state, "inner"), params)
            return u, {"count": count + 1, "hyperparams": hp, "inner": s}

        return GradientTransformation(init, update)

    return wrapped


# ----------------------------------------------------------------------------- loss scaling


def unscale_grads(grads: Mapping, scale: Tensor) -> tuple[dict, Tensor]:
    """``(grads * (1 / scale), all finite)``; the reciprocal is taken in float64 as torch's
    GradScaler does (``scale.double().reciprocal().float()``)."""
    names, gs = leaves_of(grads)
    inv = scale.double().reciprocal().float()
    gs = foreach.mul(gs, inv)
    return build(names, gs), foreach.all_finite(gs)


def update_loss_scale(scale: Tensor, good_steps: Tensor, finite: Tensor, growth_factor: float = 2.0,
                      backoff_factor: float = 0.5, growth_interval: int = 2000) -> tuple[Tensor, Tensor]:
    """torch's ``_amp_update_scale_`` rule, out of place: on overflow ``scale *= backoff`` and the
    good-step count resets; after ``growth_interval`` consecutive finite steps ``scale *= growth``
    (kept only if finite) and the count resets."""
    good = torch.where(finite, good_steps + 1, torch.zeros_like(good_steps))
    grow = good >= growth_interval
    grown = scale * growth_factor
    grown = torch.where(torch.isfinite(grown), grown, scale)
    new_scale = torch.where(finite, torch.where(grow, grown, scale), scale * backoff_factor)
    return new_scale, torch.where(grow, torch.zeros_like(good), good)


def dynamic_loss_scale(inner: GradientTransformation, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                       backoff_factor: float = 0.5, growth_interval: int = 2000) -> GradientTransformation:
    """The functional GradScaler for float16 training. Differentiate ``scale_loss(loss, state)``
    (the loss times ``state["loss_scale"]``); this transformation unscales those gradients,
    skips the step (zero updates, ``inner``'s state unchanged) when any is inf/NaN, and updates
    the scale by :func:`update_loss_scale`. Wrap it outermost.
    State ``{"loss_scale": float32, "good_steps": int64, "inner": ...}``."""
    check_transform("dynamic_loss_scale's inner", inner)
    check_number("init_scale", init_scale, min=0, min_open=True)
    check_number("growth_factor", growth_factor, min=1, min_open=True)
    check_number("backoff_factor", backoff_factor, min=0, max=1, min_open=True, max_open=True)
    check_int("growth_interval", growth_interval, min=1)

    def init(params):
        return {
            "loss_scale": torch.tensor(float(init_scale), dtype=torch.float32),
            "good_steps": step_counter(),
            "inner": inner.init(params),
        }

    def update(grads, state, params=None):
        grads, finite = unscale_grads(grads, state["loss_scale"])
        scale, good = update_loss_scale(
            state["loss_scale"], state["good_steps"], finite, growth_factor, backoff_factor, growth_interval
        )
        inner_state = substate(state, "inner")

        def step():
            u, s = inner.update(grads, inner_state, params)
            return u, {"loss_scale": scale, "good_steps": good, "inner": s}

        def skip():
            names, gs = leaves_of(grads)
            return build(names, foreach.zeros_like(gs)), {"loss_scale": scale, "good_steps": good, "inner": inner_state}

        return cond(finite, step, skip)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- readers


def _find(state: Mapping, suffix: str, what: str, hint: str) -> Tensor:
    hits = [v for n, v in tree.flatten(state).items() if n == suffix or n.endswith("." + suffix)]
    if not hits:
        raise ValueError(f"state holds no {what} ({suffix!r}); {hint}")
    return hits[0]


def loss_scale(state: Mapping) -> Tensor:
    """The current loss scale of a :func:`dynamic_loss_scale` state."""
    return _find(state, "loss_scale", "loss scale", "wrap the optimizer with dynamic_loss_scale")


def scale_loss(loss: Tensor, state: Mapping) -> Tensor:
    """``loss * loss_scale(state)``: differentiate this under :func:`dynamic_loss_scale`."""
    return loss * loss_scale(state)


def current_learning_rate(state: Mapping) -> Tensor:
    """The learning rate used by the latest update (``state["hyperparams"]["learning_rate"]``
    of an :func:`inject_hyperparams` state, found at any depth; the first one found)."""
    return _find(state, "hyperparams.learning_rate", "injected learning rate",
                 "build the optimizer with inject_hyperparams(...)(learning_rate=...)")


def last_global_norm(state: Mapping) -> Tensor:
    """The gradient norm seen by the latest :func:`clip_by_global_norm` update (before clipping)."""
    return _find(state, "global_norm", "global norm", "chain clip_by_global_norm into the optimizer")
