"""Privacy accounting for DP-SGD: the RDP accountant of the sampled Gaussian mechanism (``rdp``).

One DP-SGD step on a Poisson-sampled batch (each example joins with probability ``q``), with
per-example clipping to C and Gaussian noise N(0, σ²C²), is the *sampled Gaussian mechanism*
(SGM). Its Rényi-DP at order α (Mironov 2017; Mironov, Talwar & Zhang 2019) is

    RDP(α) = log A_α / (α − 1),   A_α = E_{z∼μ0} [(μ(z)/μ0(z))^α],   μ = (1−q) μ0 + q μ1,

with μ0 = N(0, σ²), μ1 = N(1, σ²). Steps compose by adding RDP; the total converts to (ε, δ)
by Balle et al. 2020 (Thm 21), the conversion Opacus 1.6's ``get_privacy_spent`` uses:

    ε = min_α  T·RDP(α) + log((α−1)/α) − (log δ + log α) / (α − 1).

Derivations and the tests that check each claim: ``proofs/privacy.md``. Everything here is plain
float math (no torch, no scipy).

    eps = epsilon(steps=1000, sample_rate=256/60000, noise_multiplier=1.1, delta=1e-5)
    sigma = noise_multiplier_for(target_epsilon=2.0, steps=1000, sample_rate=0.004, delta=1e-5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..checks import check_int, check_number
from .search import smallest_noise

__all__ = [
    "DEFAULT_ORDERS",
    "rdp",
    "epsilon_from_rdp",
    "epsilon",
    "noise_multiplier_for",
]

# Opacus's default orders: fractional orders near 1 matter for large ε, large orders for small ε.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


# ----------------------------------------------------------------------------- validation


def _check_sample_rate(q) -> float:
    return check_number("sample_rate", q, min=0, min_open=True, max=1)


def _check_delta(delta) -> float:
    return check_number("delta", delta, min=0, min_open=True, max=1, max_open=True)


def _check_sigma(sigma) -> float:
    return check_number("noise_multiplier", sigma, min=0)


def _check_steps(steps) -> int:
    return check_int("steps", steps, min=0)


def _check_orders(orders) -> tuple[float, ...]:
    orders = tuple(float(a) for a in orders)
    if not orders:
        raise ValueError("orders must not be empty")
    bad = [a for a in orders if not (a > 1.0) or math.isinf(a)]
    if bad:
        raise ValueError(f"RDP orders must be finite and > 1, got {bad[0]!r}")
    return orders


# ----------------------------------------------------------------------------- log-space helpers


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b)."""
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b (−inf when equal)."""
    if b == -math.inf:
        return a
    if a < b:
        raise ValueError("log-space subtraction would be negative")
    if a == b:
        return -math.inf
    d = a - b
    return a + math.log(-math.expm1(-d))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc underflows (x ≳ 26): asymptotic series there."""
    if x < 25.0:
        return math.log(math.erfc(x))
    x2 = x * x
    inv = 1.0 / (2.0 * x2)
    series = 1.0 - inv + 3.0 * inv**2 - 15.0 * inv**3 + 105.0 * inv**4
    return -x2 - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# ----------------------------------------------------------------------------- log A_α


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """Integer α: A_α = Σ_{i=0}^{α} C(α,i) (1−q)^{α−i} q^i exp((i² − i) / (2σ²))  (MTZ19 §3.3)."""
    log_a = -math.inf
    lq, l1q = math.log(q), math.log1p(-q)
    for i in range(alpha + 1):
        term = _log_binom(alpha, i) + i * lq + (alpha - i) * l1q + (i * i - i) / (2.0 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """Fractional α: split the integral at z0 where μ1/μ0 = (1−q)/q... (MTZ19 §3.3), giving

        A_α = Σ_i C(α,i) [ (1−q)^{α−i} q^i e^{(i²−i)/2σ²} · ½ erfc((i − z0)/(√2 σ))
                         + (1−q)^i q^{α−i} e^{(j²−j)/2σ²} · ½ erfc((z0 − j)/(√2 σ)) ],  j = α − i,

    with z0 = σ² log(1/q − 1) + ½; the generalized binomial C(α,i) alternates in sign for
    i > α, so each series is summed in log space with signed terms until both fall below e^−30.
    """
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    lq, l1q = math.log(q), math.log1p(-q)
    log_coef, sign = 0.0, 1.0  # C(α, 0) = 1; C(α, i+1) = C(α, i) (α − i) / (i + 1)
    i = 0
    while True:
        j = alpha - i
        log_t0 = log_coef + i * lq + j * l1q
        log_t1 = log_coef + j * lq + i * l1q
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2.0 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2.0 * sigma**2) + log_e1
        if sign > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30.0:
            break
        factor = alpha - i
        if factor == 0.0:
            break  # unreachable for fractional α; keeps the recurrence well defined
        sign = sign * (1.0 if factor > 0 else -1.0)
        log_coef += math.log(abs(factor)) - math.log(i + 1)
        i += 1
    return _log_add(log_a0, log_a1)


def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if sigma == 0.0:
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma**2)  # the plain Gaussian mechanism
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1.0)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1.0)


# ----------------------------------------------------------------------------- public API


def rdp(sample_rate: float, noise_multiplier: float, steps: int = 1, orders: Iterable[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP of ``steps`` compositions of the SGM at each order: ``steps · log A_α / (α − 1)``."""
    q = _check_sample_rate(sample_rate)
    sigma = _check_sigma(noise_multiplier)
    steps = _check_steps(steps)
    orders = _check_orders(orders)
    if steps == 0:
        return [0.0 for _ in orders]
    return [steps * _rdp_one(q, sigma, a) for a in orders]


def epsilon_from_rdp(rdp_values: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best α) from RDP values by Balle et al. 2020, Thm 21:
    ε = min_α RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1), clamped at 0."""
    delta = _check_delta(delta)
    orders = _check_orders(orders)
    if len(rdp_values) != len(orders):
        raise ValueError(f"got {len(rdp_values)} RDP values for {len(orders)} orders")
    best, best_order = math.inf, math.nan
    for r, a in zip(rdp_values, orders):
        if math.isinf(r) or math.isnan(r):
            continue
        eps = r + math.log((a - 1.0) / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


def epsilon(
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    *,
    orders: Iterable[float] = DEFAULT_ORDERS,
) -> float:
    """ε after ``steps`` DP-SGD steps at Poisson rate ``sample_rate`` and noise σ, for ``delta``.

    ``inf`` when σ = 0; 0 when steps = 0.
    """
    delta = _check_delta(delta)
    values = rdp(sample_rate, noise_multiplier, steps, orders)
    if steps == 0:
        return 0.0  # nothing released (the conversion's slack would otherwise report a small ε)
    return epsilon_from_rdp(values, tuple(orders), delta)[0]


def noise_multiplier_for(
    target_epsilon: float,
    steps: int,
    sample_rate: float,
    delta: float,
    *,
    orders: Iterable[float] = DEFAULT_ORDERS,
    rtol: float = 1e-4,
) -> float:
    """The smallest σ (to relative tolerance ``rtol``) with ``epsilon(steps, q, σ, δ) ≤ target``.

    ε decreases monotonically in σ (more noise, less privacy loss at every order):
    :func:`~aam_func.privacy.search.smallest_noise` brackets and bisects, and its σ's ε never
    exceeds the target.
    """
    check_number("target_epsilon", target_epsilon, min=0, min_open=True)
    steps = _check_steps(steps)
    q = _check_sample_rate(sample_rate)
    delta = _check_delta(delta)
    orders = _check_orders(orders)
    if steps == 0:
        return 0.0
    return smallest_noise(lambda s: epsilon(steps, q, s, delta, orders=orders), target_epsilon, rtol,
                          f"steps={steps}, sample_rate={q}, delta={delta}")
