"""Recipes: named compositions of the transformations, built in one place.

:func:`adamw_warmup_cosine` is the recipe the training run, the guide's class API, the examples,
the benchmarks and the tests all use; building it anywhere else by hand is a second copy that
can drift (a different end value, clipping left out, decay on norms).
"""

from __future__ import annotations

from typing import Any, Optional

from ..checks import check_int, check_number
from .aliases import adamw, decay_mask
from .base import GradientTransformation, chain
from .schedules import warmup_cosine
from .transforms import clip_by_global_norm
from .wrappers import inject_hyperparams

__all__ = ["adamw_warmup_cosine"]


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
