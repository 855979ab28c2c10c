"""The one inversion every accountant shares: the smallest noise multiplier whose ε meets a target.

ε is non-increasing in σ (more noise, less privacy loss), so a doubling search brackets σ and
bisection narrows it; the returned σ is the bracket's upper end, whose ε never exceeds the target.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["smallest_noise"]

_MAX_SIGMA = 1e6
_MIN_SIGMA = 1e-6


def smallest_noise(eps: Callable[[float], float], target_epsilon: float, rtol: float, what: str, *,
                   start: float = 1.0, ratio: float = 0.5) -> float:
    """The smallest σ (to relative tolerance ``rtol``) with ``eps(σ) ≤ target_epsilon``.

    The first bracket is [``ratio``·``start``, ``start``] (a good guess saves evaluations of a
    costly ``eps``); ``what`` describes the setting for the error raised when no σ up to 1e6
    reaches the target."""
    lo, hi = ratio * start, start
    while eps(hi) > target_epsilon:  # grow until hi is private enough
        lo, hi = hi, hi / ratio
        if hi > _MAX_SIGMA:
            raise ValueError(f"no noise_multiplier up to 1e6 reaches epsilon={target_epsilon} ({what})")
    while eps(lo) <= target_epsilon:  # shrink until lo is not
        lo, hi = lo * ratio, lo
        if hi < _MIN_SIGMA:
            return hi
    while (hi - lo) > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
