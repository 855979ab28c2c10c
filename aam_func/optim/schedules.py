"""Schedules: pure functions ``step -> value``.

``step`` may be a Python int (the result is a Python float) or a 0-d tensor (the result is a
float64 0-d tensor computed with torch ops: no ``.item()``, no Python branch on the value, so a
``torch.compile``d update that evaluates a schedule on its int64 step counter compiles once).
Both paths run the same code in float64, so they agree to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..checks import ArgumentTypeError, check_int, check_number, is_number

Schedule = Callable[[int | Tensor], float | Tensor]

__all__ = ["Schedule", "constant", "linear", "cosine_decay", "warmup_cosine", "warmup_linear", "join",
           "warmup_stable_decay", "linear_warmup_linear_decay"]

_F64 = torch.float64


def _step(step) -> Tensor:
    if isinstance(step, Tensor):
        return step.to(_F64)
    if not is_number(step):
        raise ArgumentTypeError(f"a schedule's step must be an int or a 0-d tensor, got {step!r}")
    return torch.tensor(float(step), dtype=_F64)


def _out(step, value: Tensor):
    return value if isinstance(step, Tensor) else float(value)


def _number(name: str, value, *, nonneg: bool = False) -> float:
    check_number(name, value, min=0 if nonneg else None)
    return float(value)


def _count(name: str, value, *, positive: bool = False) -> int:
    return check_int(name, value, min=1 if positive else 0)


def constant(value: float) -> Schedule:
    """``lr(t) = value``."""
    v = _number("value", value)

    def schedule(step):
        t = _step(step)
        return _out(step, torch.full_like(t, v))

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """``lr(t) = init + (end - init) * clip((t - begin) / steps, 0, 1)``."""
    a, b = _number("init_value", init_value), _number("end_value", end_value)
    n = _count("transition_steps", transition_steps, positive=True)
    t0 = _count("transition_begin", transition_begin)

    def schedule(step):
        frac = torch.clamp((_step(step) - t0) / n, 0.0, 1.0)
        return _out(step, a + (b - a) * frac)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, end_value: float = 0.0, num_cycles: float = 0.5) -> Schedule:
    """``lr(t) = end + (init - end) * 0.5 * (1 + cos(2 pi num_cycles * min(t / decay_steps, 1)))``."""
    a, b = _number("init_value", init_value), _number("end_value", end_value)
    n = _count("decay_steps", decay_steps, positive=True)
    c = _number("num_cycles", num_cycles, nonneg=True)

    def schedule(step):
        progress = torch.clamp(_step(step) / n, 0.0, 1.0)
        factor = 0.5 * (1.0 + torch.cos(math.pi * c * 2.0 * progress))
        return _out(step, b + (a - b) * torch.clamp(factor, min=0.0))

    return schedule


def warmup_cosine(
    peak_value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0, num_cycles: float = 0.5
) -> Schedule:
    """Linear warmup from 0 to ``peak_value``, then cosine annealing to ``end_value``.

    As ``transformers.get_cosine_schedule_with_warmup`` (lr = peak * factor):
    ``factor = t / max(1, warmup)`` for ``t < warmup``, else with
    ``p = (t - warmup) / max(1, total - warmup)``: ``factor = max(0, 0.5 (1 + cos(2 pi cycles p)))``,
    and ``lr = end + (peak - end) * factor`` (transformers' ``min_lr_rate = end / peak``).
    Past ``total_steps`` the progress is held at 1 (transformers' cosine would rise again).
    """
    peak, end = _number("peak_value", peak_value, nonneg=True), _number("end_value", end_value, nonneg=True)
    w = _count("warmup_steps", warmup_steps)
    total = _count("total_steps", total_steps, positive=True)  # 0 steps: no schedule to run
    if total < w:
        raise ValueError(f"total_steps ({total}) must be >= warmup_steps ({w})")
    c = _number("num_cycles", num_cycles, nonneg=True)

    def schedule(step):
        t = _step(step)
        warm = peak * (t / max(1, w))
        progress = torch.clamp((t - w) / max(1, total - w), max=1.0)
        factor = 0.5 * (1.0 + torch.cos(math.pi * c * 2.0 * progress))
        # transformers: factor * (1 - min_lr_rate) + min_lr_rate, then max(0, .); times peak
        rate = end / peak if peak > 0 else 0.0
        cos = peak * torch.clamp(factor * (1 - rate) + rate, min=0.0)
        return _out(step, torch.where(t < w, warm, cos))

    return schedule


def warmup_linear(peak_value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0) -> Schedule:
    """Linear warmup from 0 to ``peak_value``, then linear decay to ``end_value`` at ``total_steps``
    (``transformers.get_linear_schedule_with_warmup`` when ``end_value == 0``)."""
    peak, end = _number("peak_value", peak_value, nonneg=True), _number("end_value", end_value, nonneg=True)
    w = _count("warmup_steps", warmup_steps)
    total = _count("total_steps", total_steps, positive=True)  # 0 steps: no schedule to run
    if total < w:
        raise ValueError(f"total_steps ({total}) must be >= warmup_steps ({w})")

    def schedule(step):
        t = _step(step)
        warm = peak * (t / max(1, w))
        factor = torch.clamp((total - t) / max(1, total - w), min=0.0)
        return _out(step, torch.where(t < w, warm, end + (peak - end) * factor))

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Piecewise: ``schedules[i](t - boundaries[i-1])`` for ``boundaries[i-1] <= t < boundaries[i]``."""
    schedules, boundaries = list(schedules), list(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join needs len(schedules) == len(boundaries) + 1, got {len(schedules)} schedules "
            f"and {len(boundaries)} boundaries"
        )
    for i, b in enumerate(boundaries):
        _count(f"boundaries[{i}]", b)
    if boundaries != sorted(boundaries):
        raise ValueError(f"boundaries must be increasing, got {boundaries}")

    def schedule(step):
        t = _step(step)
        value = _step(schedules[0](t))
        for b, s in zip(boundaries, schedules[1:]):
            value = torch.where(t >= b, _step(s(t - b)), value)
        return _out(step, value)

    return schedule


def warmup_stable_decay(peak_value: float, warmup_steps: int, total_steps: int, decay_steps: int,
                        end_value: float = 0.0) -> Schedule:
    """Warmup-stable-decay ("WSD", Hu et al. 2024, MiniCPM eq. 1; Hägele et al. 2024): linear
    warmup from 0 to ``peak_value`` over ``warmup_steps`` (``peak t / warmup``), the peak held,
    then a linear decay to ``end_value`` over the last ``decay_steps`` steps before ``total_steps``
    (held at ``end_value`` after). ``warmup_steps + decay_steps <= total_steps``."""
    peak, end = _number("peak_value", peak_value, nonneg=True), _number("end_value", end_value, nonneg=True)
    w = _count("warmup_steps", warmup_steps)
    total = _count("total_steps", total_steps, positive=True)
    d = _count("decay_steps", decay_steps)
    if w + d > total:
        raise ValueError(f"warmup_steps + decay_steps ({w} + {d}) must be <= total_steps ({total})")
    start = total - d

    def schedule(step):
        t = _step(step)
        warm = peak * (t / max(1, w))
        frac = torch.clamp((t - start) / max(1, d), 0.0, 1.0)
        return _out(step, torch.where(t < w, warm, peak + (end - peak) * frac))

    return schedule


def linear_warmup_linear_decay(peak_value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0,
                               decay_steps: int | None = None) -> Schedule:
    """Optax's name for the same family: WSD whose decay spans ``decay_steps`` (default: every
    step after the warmup, i.e. :func:`warmup_linear`'s shape)."""
    w = _count("warmup_steps", warmup_steps)
    total = _count("total_steps", total_steps, positive=True)
    if decay_steps is None:
        if total < w:
            raise ValueError(f"total_steps ({total}) must be >= warmup_steps ({w})")
        decay_steps = total - w
    return warmup_stable_decay(peak_value, w, total, decay_steps, end_value)
