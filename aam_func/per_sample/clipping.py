"""Clipping strategies of DP-SGD as Optax-shaped transformations over *per-example* gradients.

A :class:`Clipping` is ``(init, update, sensitivity, gradient_noise)``: ``update(per_example,
state)`` returns the clipped per-example gradients (leaves (B, *shape)) and the next state;
``sensitivity(state)`` is the L2 bound of one example's clipped contribution at that state (the
noise is σ times it); ``gradient_noise(σ)`` is the multiplier the gradient's noise gets when the
strategy spends part of σ's budget itself (adaptive clipping). :func:`aam_func.per_sample.dp_aggregate`
takes one in place of a clip norm::

    dp_aggregate(flat(1.0), sigma)                          # = dp_aggregate(1.0, sigma)
    dp_aggregate(per_layer(1.0, group=lambda name: name.split(".")[0]), sigma)
    dp_aggregate(adaptive(0.1, target_quantile=0.5, expected_batch_size=256), sigma)

- **flat**: every example's whole gradient to norm ≤ C (today's DP-SGD).
- **per-layer**: the gradient split into groups (``group(name)`` of each leaf's dotted name; by
  default each leaf alone), group k clipped to C_k. The budget split: C_k = C·√(w_k/Σw) (``weights``,
  equal by default: C/√K), so Σ C_k² = C² and one example moves the sum by at most C, the
  sensitivity the accountant assumes; explicit ``max_norms`` give sensitivity √(Σ C_k²).
- **adaptive** (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with
  Adaptive Clipping"): flat clipping at C_t, and C_{t+1} = C_t·exp(−η(b̃_t − γ)) where b̃_t is
  the noised fraction of examples with ‖g_i‖ ≤ C_t: b̃ = (Σ_i (1[‖g_i‖ ≤ C_t] − ½) + N(0, σ_b²))/n + ½.
  The count has sensitivity ½, so gradient noise σ_Δ and count noise σ_b together are one
  Gaussian mechanism of multiplier σ with σ⁻² = σ_Δ⁻² + (2σ_b)⁻² (their Thm 1): the accountant's σ
  is kept and the gradient gets σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½) (``gradient_noise``).

Proofs and tests: ``proofs/privacy_accountants.md`` §4–5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import tree
from ..checks import check_int, check_number
from .clip import check_max_norm, clip_factors, global_norms

__all__ = ["Clipping", "flat", "per_layer", "adaptive", "quantile_step", "count_below", "adaptive_gradient_noise",
           "DEFAULT_CLIP_LEARNING_RATE"]

DEFAULT_CLIP_LEARNING_RATE = 0.2  # η of the geometric update (Andrew et al.'s choice)
_CLIP_STREAM = 0x636C6970  # keeps the count's noise stream apart from the gradient's (seed, step) one


class Clipping(NamedTuple):
    init: Callable
    update: Callable
    sensitivity: Callable[[dict], float]
    gradient_noise: Callable[[float], float]


def _same(sigma: float) -> float:
    return sigma


def _scale_rows(w: Tensor, x: Tensor) -> Tensor:
    return x * w.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def flat(max_norm: float) -> Clipping:
    """Each example's gradient (all leaves together) to L2 norm ≤ ``max_norm``."""
    c = check_max_norm(max_norm)

    def update(per_example, state, params=None):
        w = clip_factors(global_norms(per_example), c)
        return tree.map(lambda x: _scale_rows(w, x), per_example), state

    return Clipping(lambda params: {}, update, lambda state: c, _same)


def _group_norms(max_norm: Optional[float], max_norms: Optional[Mapping[str, float]], weights, groups: list) -> dict:
    if max_norms is not None:
        missing = [g for g in groups if g not in max_norms]
        if missing:
            raise ValueError(f"max_norms has no clip norm for group(s) {missing}; it has {sorted(max_norms)}")
        return {g: check_max_norm(max_norms[g]) for g in groups}
    c = check_number("max_norm", max_norm, min=0, min_open=True)
    w = {g: check_number(f"weights[{g!r}]", (weights or {}).get(g, 1.0), min=0, min_open=True) for g in groups}
    total = sum(w.values())
    return {g: c * math.sqrt(w[g] / total) for g in groups}


def per_layer(max_norm: Optional[float] = None, *, group: Optional[Callable[[str], str]] = None,
              weights: Optional[Mapping[str, float]] = None,
              max_norms: Optional[Mapping[str, float]] = None) -> Clipping:
    """Group k of each example's gradient to norm ≤ C_k. Groups: ``group(name)`` of each leaf's
    dotted name (default: the name, a group per leaf). Either ``max_norm`` C, split as
    C_k = C·√(w_k/Σw) (``weights`` per group, default 1), or ``max_norms`` {group: C_k}. The
    sensitivity is √(Σ_k C_k²) (= C for a split)."""
    if (max_norm is None) == (max_norms is None):
        raise ValueError("per_layer needs exactly one of max_norm (split over the groups) and max_norms (per group)")
    name_to_group = group if group is not None else (lambda name: name)

    def layout(per_example) -> tuple[list, list, object, dict]:
        names, leaves, spec = tree.paths(per_example)
        groups = [name_to_group(n) for n in names]
        return groups, leaves, spec, _group_norms(max_norm, max_norms, weights, sorted(set(groups)))

    def init(params):
        groups, _, _, norms = layout(params)
        return {"sensitivity": math.sqrt(sum(c * c for c in norms.values()))}

    def update(per_example, state, params=None):
        groups, leaves, spec, norms = layout(per_example)
        out = list(leaves)
        for g, c in norms.items():
            idx = [i for i, gi in enumerate(groups) if gi == g]
            w = clip_factors(global_norms([leaves[i] for i in idx]), c)
            for i in idx:
                out[i] = _scale_rows(w, leaves[i])
        return tree.rebuild(out, spec), state

    return Clipping(init, update, lambda state: float(state["sensitivity"]), _same)


def adaptive_gradient_noise(noise_multiplier: float, count_noise: float) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½): the gradient's share of multiplier σ when the clipped count
    takes noise σ_b (Andrew et al. 2021, Thm 1). σ_b must exceed σ/2."""
    sigma = check_number("noise_multiplier", noise_multiplier, min=0)
    sb = check_number("count_noise", count_noise, min=0, min_open=True)
    if sigma == 0:
        return 0.0
    if not 2.0 * sb > sigma:
        raise ValueError(f"count_noise must exceed noise_multiplier / 2 = {sigma / 2:g} for the adaptive clip norm to "
                         f"leave the gradient any noise budget, got {sb:g}")
    return (sigma**-2 - (2.0 * sb) ** -2) ** -0.5


def quantile_step(max_norm: float, below: float, target_quantile: float, learning_rate: float, count_noise: float,
                  n: float, generator: Optional[torch.Generator]) -> float:
    """C·exp(−η(b̃ − γ)), b̃ = (``below`` + N(0, σ_b²))/n + ½ with ``below`` = Σ_i (1[‖g_i‖ ≤ C] − ½):
    one private step of the geometric quantile estimate (the one implementation, for the
    transformation and the training run, which sums ``below`` over its processes first)."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise if count_noise > 0 else 0.0
    frac = (float(below) + noise) / n + 0.5
    return max_norm * math.exp(-learning_rate * (frac - target_quantile))


def count_below(norms: Tensor, max_norm: float) -> float:
    """Σ_i (1[‖g_i‖ ≤ C] − ½): the centred count of unclipped examples (sensitivity ½)."""
    return float((norms <= max_norm).sum()) - 0.5 * norms.numel()


def adaptive(initial_norm: float, *, target_quantile: float = 0.5, learning_rate: float = DEFAULT_CLIP_LEARNING_RATE,
             expected_batch_size: float, count_noise: Optional[float] = None, seed: int = 0) -> Clipping:
    """Flat clipping at a norm that tracks the ``target_quantile`` of the per-example norms
    privately. ``count_noise`` σ_b defaults to ``expected_batch_size``/20 (Andrew et al.); the
    count's noise is drawn from a generator seeded by (``seed``, step), so the transform is pure."""
    c0 = check_number("initial_norm", initial_norm, min=0, min_open=True)
    gamma = check_number("target_quantile", target_quantile, min=0, max=1, min_open=True, max_open=True)
    eta = check_number("learning_rate", learning_rate, min=0)
    n = check_number("expected_batch_size", expected_batch_size, min=0, min_open=True)
    sb = n / 20.0 if count_noise is None else check_number("count_noise", count_noise, min=0, min_open=True)
    seed = check_int("seed", seed)

    def init(params):
        return {"max_norm": torch.tensor(c0, dtype=torch.float64), "count": torch.zeros((), dtype=torch.int64)}

    def update(per_example, state, params=None):
        c, count = float(state["max_norm"]), int(state["count"])
        norms = global_norms(per_example)
        w = clip_factors(norms, c)
        g = torch.Generator().manual_seed(hash((seed, count, _CLIP_STREAM)) & ((1 << 63) - 1))
        new = quantile_step(c, count_below(norms, c), gamma, eta, sb, n, g)
        clipped = tree.map(lambda x: _scale_rows(w, x), per_example)
        return clipped, {"max_norm": torch.tensor(new, dtype=torch.float64), "count": state["count"] + 1}

    return Clipping(init, update, lambda state: float(state["max_norm"]), lambda s: adaptive_gradient_noise(s, sb))
