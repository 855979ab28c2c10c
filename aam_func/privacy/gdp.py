"""The Gaussian-DP accountant (Dong, Roth & Su 2019/2022, "Gaussian Differential Privacy"), with
the central limit theorem for Poisson subsampling (Bu, Dong, Long & Su 2020, "Deep Learning with
Gaussian Differential Privacy").

T Poisson-subsampled Gaussian steps (rate q, noise σ) are asymptotically μ-GDP with

    μ = q · √(T (e^{1/σ²} − 1)),    and a mixed history (σ_i, q_i, T_i):  μ² = Σ_i q_i² T_i (e^{1/σ_i²} − 1),

and μ-GDP is (ε, δ(ε))-DP for every ε ≥ 0 with (DRS Cor. 2.13)

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).

δ(ε) decreases in ε, so ε(δ) is found by bisection. The CLT is an approximation: it can
*underestimate* ε for few steps or large q (Gopi et al. 2021 show cases); the PRV accountant is
the one with a guarantee. Derivations: ``proofs/privacy_accountants.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .renyi import _log_erfc

__all__ = ["mu", "delta_for", "epsilon", "noise_for_mu", "mu_for"]

_EPS_MAX = 500.0


def _log_phi(x: float) -> float:
    """log Φ(x) = log(½ erfc(−x/√2)), accurate in the far lower tail."""
    return math.log(0.5) + _log_erfc(-x / math.sqrt(2.0))


def mu(history: Sequence[tuple]) -> float:
    """μ of the history [(σ, q, steps), ...] by the Poisson-subsampling CLT (inf when some σ = 0
    takes a step, or e^{1/σ²} overflows float64, σ < 0.0375: as Opacus's compute_mu_poisson)."""
    total = 0.0
    for sigma, q, steps in history:
        if steps == 0:
            continue
        if sigma == 0:
            return math.inf
        total += q * q * steps * _expm1_or_inf(1.0 / sigma**2)
    return math.sqrt(total)


def delta_for(eps: float, mu_: float) -> float:
    """δ(ε) of μ-GDP."""
    if mu_ == 0:
        return 0.0
    a = math.exp(_log_phi(-eps / mu_ + mu_ / 2))
    b = math.exp(eps + _log_phi(-eps / mu_ - mu_ / 2))
    return max(a - b, 0.0)


def epsilon(history: Sequence[tuple], delta: float) -> float:
    """ε at ``delta`` of the history's μ-GDP (0 when δ(0) ≤ δ; inf when μ is, or ε > 500: Opacus's bracket)."""
    m = mu(history)
    if math.isinf(m):
        return math.inf
    if delta_for(0.0, m) <= delta:
        return 0.0
    if delta_for(_EPS_MAX, m) > delta:
        return math.inf
    lo, hi = 0.0, _EPS_MAX
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if delta_for(mid, m) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def mu_for(target_epsilon: float, delta: float) -> float:
    """The largest μ whose ε at ``delta`` is at most ``target_epsilon`` (δ(ε) increases in μ)."""
    lo, hi = 0.0, 1.0
    while delta_for(target_epsilon, hi) <= delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        if delta_for(target_epsilon, mid) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


def noise_for_mu(target_mu: float, sample_rate: float, steps: int, spent_mu: float = 0.0) -> float:
    """σ such that ``steps`` more steps at rate q bring μ from ``spent_mu`` to ``target_mu``:
    q² T (e^{1/σ²} − 1) = μ_target² − μ_spent²  ⇒  σ = 1 / √(log(1 + (μ_t² − μ_s²)/(q² T)))."""
    room = target_mu**2 - spent_mu**2
    if room <= 0:
        raise ValueError(f"the budget is already spent (mu {spent_mu:.4g} of {target_mu:.4g})")
    return 1.0 / math.sqrt(math.log1p(room / (sample_rate**2 * steps)))


def _expm1_or_inf(x: float) -> float:
    """e^x − 1, inf where it overflows float64 (math.expm1 raises there)."""
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf
