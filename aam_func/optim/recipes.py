"""Recipes: named compositions of the transformations, built in one place.

:func:`adamw_warmup_cosine` is the recipe the training run, the guide's class API, the examples,
the benchmarks and the tests all use; building it anywhere else by hand is a second copy that
can drift (a different end value, clipping left out, decay on norms).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from ..checks import check_choice, check_int, check_number
from .adafactor import adafactor
from .aliases import adamw, decay_mask, lion
from .averaging import ema as ema_wrapper
from .base import GradientTransformation, chain
from .muon import muon
from .schedule_free import schedule_free_adamw
from .schedules import warmup_cosine
from .transforms import clip_by_global_norm
from .wrappers import inject_hyperparams

__all__ = ["adamw_warmup_cosine", "run_optimizer", "RUN_OPTIMIZERS"]

# what `aam-func train --optimizer` offers
RUN_OPTIMIZERS = ("adamw", "muon", "adafactor", "schedule-free", "lion")


def adamw_warmup_cosine(
    params: Any,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    end_value: float = 0.0,
    weight_decay: float = 0.01,
    max_grad_norm: Optional[float] = 1.0,
    mask: Any = None,
) -> GradientTransformation:
    """Global-norm clipping, then AdamW with a warmup-cosine learning rate::

        g ← g · min(1, max_grad_norm / ‖g‖₂)                (skipped when max_grad_norm is None or 0)
        lr(t) = warmup_cosine(learning_rate, warmup_steps, total_steps, end_value)(t)
        p ← p − lr(t) · (adam_direction(g) + weight_decay · p · mask)

    ``mask`` says which leaves decay (default :func:`decay_mask` of ``params``: matrices and
    embeddings, not biases or norm gains). The learning rate is injected
    (:func:`inject_hyperparams`), so ``current_learning_rate(state)`` reads it and the state saves
    it; with clipping, ``last_global_norm(state)`` reads the pre-clipping norm.
    """
    check_number("learning_rate", learning_rate, min=0, min_open=True)
    check_int("total_steps", total_steps, min=1)
    check_int("warmup_steps", warmup_steps, min=0)
    check_number("max_grad_norm", max_grad_norm, min=0, allow_none=True)
    schedule = warmup_cosine(learning_rate, warmup_steps, total_steps, end_value=end_value)
    opt = inject_hyperparams(adamw)(learning_rate=schedule, weight_decay=weight_decay,
                                    mask=decay_mask(params) if mask is None else mask)
    if not max_grad_norm:
        return opt
    return chain(clip_by_global_norm(max_grad_norm), opt)


def _inject(factory, *injected: str):
    """:func:`inject_hyperparams` of ``factory`` with only ``injected`` in the state (the others
    stay Python values: integer counts, betas that the kernels take as numbers)."""
    names = [n for n in inspect.signature(factory).parameters if n not in injected]
    return inject_hyperparams(factory, static_args=names)


def run_optimizer(
    params: Any,
    *,
    optimizer: str = "adamw",
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    end_value: float = 0.0,
    weight_decay: float = 0.01,
    max_grad_norm: Optional[float] = 1.0,
    ema: Optional[float] = None,
    muon_learning_rate: float = 0.02,
    muon_momentum: float = 0.95,
) -> GradientTransformation:
    """The training run's optimizer (``aam-func train --optimizer``): global-norm clipping, then

    - ``adamw``: :func:`adamw_warmup_cosine`;
    - ``lion``: :func:`lion` with the same warmup-cosine rate and decay mask;
    - ``muon``: :func:`muon` on the hidden matrices (peak ``muon_learning_rate``, ``muon_momentum``,
      the same warmup-cosine shape), AdamW at ``learning_rate`` on embeddings, biases and norms;
    - ``adafactor``: :func:`adafactor` with ``ρ_t = min(lr(t), 1/√t)``, ``lr(t)`` warmup-cosine;
    - ``schedule-free``: :func:`schedule_free_adamw` at the constant ``learning_rate`` with its own
      ``warmup_steps`` linear warmup (no cosine: that is the point), evaluated at ``x``;

    and with ``ema`` (a decay) the whole is wrapped in :func:`aam_func.optim.ema`: the state keeps
    the averaged params, which :func:`aam_func.optim.eval_params` returns. Weight decay follows
    :func:`decay_mask` (matrices and embeddings) except schedule-free's, which decays every leaf
    as its reference does. The learning rate is injected, so ``current_learning_rate`` reads it.
    """
    check_choice("optimizer", optimizer, RUN_OPTIMIZERS)
    check_number("ema", ema, min=0, max=1, allow_none=True)
    if optimizer == "adamw":
        opt = adamw_warmup_cosine(params, learning_rate=learning_rate, total_steps=total_steps,
                                  warmup_steps=warmup_steps, end_value=end_value, weight_decay=weight_decay,
                                  max_grad_norm=max_grad_norm)
        return opt if ema is None else ema_wrapper(opt, ema)
    check_number("learning_rate", learning_rate, min=0, min_open=True)
    check_int("total_steps", total_steps, min=1)
    check_int("warmup_steps", warmup_steps, min=0)
    check_number("max_grad_norm", max_grad_norm, min=0, allow_none=True)
    ratio = end_value / learning_rate
    mask = decay_mask(params)
    if optimizer == "lion":
        opt = _inject(lion, "learning_rate", "weight_decay")(learning_rate=warmup_cosine(learning_rate, warmup_steps, total_steps, end_value),
                                       weight_decay=weight_decay, mask=mask)
    elif optimizer == "muon":
        check_number("muon_learning_rate", muon_learning_rate, min=0, min_open=True)
        opt = _inject(muon, "learning_rate", "adam_learning_rate", "weight_decay", "adam_weight_decay")(
            learning_rate=warmup_cosine(muon_learning_rate, warmup_steps, total_steps, muon_learning_rate * ratio),
            momentum=muon_momentum, weight_decay=weight_decay,
            adam_learning_rate=warmup_cosine(learning_rate, warmup_steps, total_steps, end_value),
            adam_weight_decay=weight_decay, adam_mask=mask)
    elif optimizer == "adafactor":
        opt = _inject(adafactor, "learning_rate", "weight_decay")(
            learning_rate=warmup_cosine(learning_rate, warmup_steps, total_steps, end_value),
            weight_decay=weight_decay, mask=mask)
    else:
        opt = _inject(schedule_free_adamw, "learning_rate", "weight_decay")(learning_rate=learning_rate, weight_decay=weight_decay,
                                                      warmup_steps=warmup_steps)
    if max_grad_norm:
        opt = chain(clip_by_global_norm(max_grad_norm), opt)
    return opt if ema is None else ema_wrapper(opt, ema)
