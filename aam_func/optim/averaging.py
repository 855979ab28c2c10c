"""Weight averaging wrappers: ``ema`` (Polyak/exponential averaging of the params) and
``lookahead`` (slow and fast weights), and :func:`eval_params`, the one reader that turns a
state of any of the averaging optimizers (these two and :func:`schedule_free_adamw`) into the
params to evaluate. Formulas: ``proofs/optim_modern.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import tree
from ..checks import check_int, check_number, is_number
from . import foreach
from .base import (
    GradientTransformation,
    aligned,
    build,
    check_transform,
    cond,
    entry,
    leaves_of,
    step_counter,
    substate,
)

__all__ = ["ema", "lookahead", "eval_params", "has_average"]


def _inner_updates(names, ps, updates):
    """The inner updates as a list aligned to the params, each in its param's dtype."""
    return [u.to(p.dtype) for p, u in zip(ps, aligned(names, updates, "inner updates", "params", like=ps))]


def _new_params(names, ps, updates):
    """``(p + u, u)`` leafwise (``u`` aligned to the params, in their dtype)."""
    us = _inner_updates(names, ps, updates)
    return foreach.add(ps, us), us


def ema(inner: GradientTransformation, decay: float = 0.999) -> GradientTransformation:
    """``inner``, plus an exponential moving average of the params it produces, kept in the state
    (as ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``, updated
    after every step): ``a_1 = p_1``, then ``a_t = decay a_{t-1} + (1 - decay) p_t``
    (``lerp(a, p_t, 1 - decay)``), where ``p_t = p_{t-1} + u_t``. The updates are ``inner``'s
    unchanged. Read the average with :func:`eval_params`. Optax's ``ema`` averages the
    *updates*; this averages the params, as torch's ``AveragedModel`` and ``--ema`` mean it.
    Needs ``params``. State ``{"count": int64, "ema": tree, "inner": ...}``.
    """
    check_transform("ema's inner", inner)
    if not isinstance(decay, torch.Tensor):
        check_number("decay", decay, min=0, max=1)

    def init(params):
        names, ps = leaves_of(params, "params")
        return {"count": step_counter(), "ema": build(names, [p.clone() for p in ps]), "inner": inner.init(params)}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        u, s = inner.update(grads, substate(state, "inner"), params)
        new_p, _ = _new_params(names, ps, u)
        avg = aligned(names, entry(state, "ema", "ema state"), "ema state 'ema'", like=gs)
        count = entry(state, "count", "ema state")
        # AveragedModel copies the params at its first update, then lerps
        # (the lerp writes into new_p, this call's own buffer, where it may)
        avg, _ = cond(count == 0, lambda: (build(names, new_p), {}),
                      lambda: (build(names, foreach.lerp_into(avg, new_p, 1 - decay)), {}))
        return u, {"count": count + 1, "ema": avg, "inner": s}

    return GradientTransformation(init, update)


def lookahead(inner: GradientTransformation, sync_period: int = 5, alpha: float = 0.5) -> GradientTransformation:
    """Lookahead (Zhang, Lucas, Hinton, Ba 2019, Algorithm 1): the params are the fast weights
    ``θ``, updated by ``inner``; every ``sync_period`` steps the slow weights move toward them,
    ``φ ← φ + alpha (θ - φ)``, and the fast weights restart from there (``θ ← φ``). The update
    returned is ``θ_new - θ``. :func:`eval_params` gives the slow weights ``φ`` (the paper's
    output). Needs ``params``. State ``{"count": int64, "slow": tree, "inner": ...}``.
    """
    check_transform("lookahead's inner", inner)
    check_int("sync_period", sync_period, min=1)
    if not isinstance(alpha, torch.Tensor):
        check_number("alpha", alpha, min=0, max=1)

    def init(params):
        names, ps = leaves_of(params, "params")
        return {"count": step_counter(), "slow": build(names, [p.clone() for p in ps]), "inner": inner.init(params)}

    def update(grads, state, params=None):
        names, gs = leaves_of(grads)
        ps = aligned(names, params, "params", like=gs)
        u, s = inner.update(grads, substate(state, "inner"), params)
        us = _inner_updates(names, ps, u)
        slow = aligned(names, entry(state, "slow", "lookahead state"), "lookahead state 'slow'", like=gs)
        count = entry(state, "count", "lookahead state") + 1
        w = alpha if is_number(alpha) else alpha.to(foreach.SCALAR_DTYPE)

        def synced():  # φ ← lerp(φ, θ_new, alpha); θ ← φ, i.e. u = φ - θ; θ_new only on sync steps
            new_slow = foreach.lerp_into(slow, foreach.add(ps, us), w)
            return build(names, foreach.add(new_slow, ps, alpha=-1.0)), {"slow": build(names, new_slow)}

        def plain():  # between syncs the updates are the inner's
            return build(names, us), {"slow": build(names, slow)}

        out, part = cond(count % sync_period == 0, synced, plain)
        return out, {"count": count, "slow": part["slow"], "inner": s}

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- eval_params


def _averaging_states(state: Any, found: list) -> None:
    """Every sub-state of an averaging optimizer, outermost first (depth-first)."""
    if not isinstance(state, Mapping):
        return
    if "ema" in state and "inner" in state and "count" in state:
        found.append(("ema", state))
    elif "slow" in state and "inner" in state:
        found.append(("slow", state))
    elif "z" in state and "b1" in state:
        found.append(("schedule_free", state))
    for v in state.values():
        _averaging_states(v, found)


def eval_params(state: Any, params: Any) -> Any:
    """The params to evaluate for an optimizer state: the EMA of :func:`ema`, the slow weights of
    :func:`lookahead`, the ``x`` point of :func:`schedule_free_adamw`; ``params`` itself when the
    state holds none of them. The outermost averaging state wins (``ema(schedule_free_adamw())``
    evaluates the EMA). Leaves the state does not cover (another partition's) are ``params``'.
    Pure; the result has ``params``' form."""
    from .schedule_free import sf_point

    found: list = []
    _averaging_states(state, found)
    if not found:
        return params
    kind, sub = found[0]
    names, ps = leaves_of(params, "params")
    key = {"ema": "ema", "slow": "slow", "schedule_free": "z"}[kind]
    covered = set(n for n, x in tree.flatten(sub[key]).items() if x is not None)
    idx = [i for i, n in enumerate(names) if n in covered]
    sel_names, sel_ps = [names[i] for i in idx], [ps[i] for i in idx]
    if kind == "schedule_free":
        new = sf_point(sub, sel_names, sel_ps)
    else:
        new = aligned(sel_names, tree.subset(sub[key], lambda n, x: n in set(sel_names)), f"state '{key}'",
                      "params", like=sel_ps)
        new = [x.to(p.dtype) for x, p in zip(new, sel_ps)]
    out = list(ps)
    for i, x in zip(idx, new):
        out[i] = x
    return build(names, out)


def has_average(state: Any) -> bool:
    """Whether ``state`` holds an averaging optimizer's state (:func:`eval_params` then differs
    from the params: a run saves both)."""
    found: list = []
    _averaging_states(state, found)
    return bool(found)
