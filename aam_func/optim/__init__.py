"""Stateless optimizers and schedules, Optax-shaped, on ``torch._foreach_*``.

A :class:`GradientTransformation` is ``(init, update)``: pure functions over Params trees::

    from aam_func import optim

    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine(3e-4, 100, 10_000), weight_decay=0.1, mask=optim.decay_rule),
    )
    state = opt.init(params)                           # a Params tree: saves with tree.save
    updates, state = opt.update(grads, state, params)  # nothing is written in place
    params = optim.apply_updates(params, updates)

Formulas and the tests that check them: ``proofs/optim.md``.
"""

from .aliases import adam, adamw, decay_mask, decay_rule, lion, sgd
from .base import GradientTransformation, apply_updates, chain, global_norm, identity, set_to_zero
from . import implicit
from .adafactor import adafactor
from .averaging import ema, eval_params, has_average, lookahead
from .large_batch import lamb, lars, scale_by_trust_ratio
from .meta import unroll
from .muon import muon, muon_rule, orthogonalize, scale_by_muon
from .recipes import RUN_OPTIMIZERS, adamw_warmup_cosine, run_optimizer
from .sam import sam
from .schedule_free import schedule_free_adamw, schedule_free_eval_params
from .sophia import sophia
from .schedules import (Schedule, constant, cosine_decay, join, linear, linear_warmup_linear_decay, warmup_cosine,
                        warmup_linear, warmup_stable_decay)
from .transforms import (
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_schedule,
    trace,
)
from .wrappers import (
    apply_if_finite,
    current_learning_rate,
    dynamic_loss_scale,
    freeze,
    inject_hyperparams,
    last_global_norm,
    loss_scale,
    masked,
    multi_steps,
    partition,
    scale_loss,
    unscale_grads,
    update_loss_scale,
)

momentum = trace  # Optax's other name for it

__all__ = [
    "GradientTransformation", "apply_updates", "chain", "identity", "set_to_zero", "global_norm",
    "scale", "scale_by_learning_rate", "scale_by_schedule", "scale_by_adam", "scale_by_lion", "trace",
    "momentum", "add_decayed_weights", "clip_by_global_norm", "clip",
    "masked", "partition", "freeze", "multi_steps", "apply_if_finite", "inject_hyperparams",
    "dynamic_loss_scale", "unscale_grads", "update_loss_scale", "loss_scale", "scale_loss",
    "current_learning_rate", "last_global_norm",
    "sgd", "adam", "adamw", "lion", "decay_rule", "decay_mask",
    "adamw_warmup_cosine", "run_optimizer", "RUN_OPTIMIZERS",
    "Schedule", "constant", "linear", "cosine_decay", "warmup_cosine", "warmup_linear", "join",
    "warmup_stable_decay", "linear_warmup_linear_decay",
    "muon", "scale_by_muon", "orthogonalize", "muon_rule", "adafactor", "schedule_free_adamw",
    "schedule_free_eval_params", "ema", "lookahead", "eval_params", "has_average", "sam", "lamb", "lars",
    "scale_by_trust_ratio", "sophia", "unroll", "implicit",
]
