"""The PRV accountant (Gopi, Lee & Wutschitz 2021, "Numerical Composition of Differential
Privacy"): the privacy-loss random variable of each step, discretised on a grid, composed by FFT,
and ε read off the composed distribution with an error bound.

One step of the Poisson-subsampled Gaussian mechanism (rate q, noise σ, sensitivity 1) has
privacy loss Y = log(P(X)/Q(X)), X ∼ P = (1−q)N(0, σ²) + qN(1, σ²), Q = N(0, σ²), so
Y = log(1 − q + q e^{(2X−1)/2σ²}) > log(1 − q) and, with z = log((e^t − (1−q))/q),

    F(t) = P(Y ≤ t) = 1 − ½(1−q) erfc((2σ²z + 1)/(2√2σ)) − ½ q erfc((2σ²z − 1)/(2√2σ)).

T steps compose by adding their Y's; δ(ε) = E[(1 − e^{ε−Y})₊] of the sum. The grid: Y truncated
to [−L, L] (L from the RDP tail bound, GLW21 Remark 5.6), mesh h = ε_err / √(T log(12/δ_err)/2),
each cell's mass F(t + h/2) − F(t − h/2), the grid shifted so the discrete mean equals the
continuous one (GLW21 §5). Then ε_upper = ε̂(δ − δ_err) + ε_err bounds the true ε (GLW21 Thm 5.5);
that bound is what :func:`epsilon` returns. Derivations: ``proofs/privacy_accountants.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .renyi import epsilon_from_rdp, rdp

__all__ = ["epsilon", "epsilon_bounds", "cdf", "DEFAULT_EPS_ERROR"]

DEFAULT_EPS_ERROR = 0.01  # ε_err; δ_err defaults to δ/1000 (as Opacus)
_F64 = torch.float64
# the orders of the RDP tail bound that sizes the grid: any orders give a valid bound; these few
# (most integer, whose series is finite) cost a fraction of DEFAULT_ORDERS' time for a similar L
_DOMAIN_ORDERS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0)


def cdf(t: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """F(t) = P(Y ≤ t) of one step's privacy loss (float64; 0 for t ≤ log(1 − q))."""
    t = t.to(_F64)
    floor = math.log1p(-q) if q < 1.0 else -math.inf
    above = t > floor
    inner = torch.where(above, torch.expm1(t) + q, torch.ones_like(t) * q)  # e^t − (1 − q)
    z = torch.log(inner) - math.log(q)
    a = 2.0 * sigma**2 * z
    c = 2.0 * math.sqrt(2.0) * sigma
    f = 1.0 - 0.5 * (1.0 - q) * torch.special.erfc((a + 1.0) / c) - 0.5 * q * torch.special.erfc((a - 1.0) / c)
    return torch.where(above, f, torch.zeros_like(t))


def _truncated_cdf(t: torch.Tensor, q: float, sigma: float, lo: float, hi: float) -> torch.Tensor:
    f_lo, f_hi = cdf(torch.tensor([lo, hi], dtype=_F64), q, sigma).tolist()
    out = (cdf(t, q, sigma) - f_lo) / (f_hi - f_lo)
    return torch.where(t < lo, torch.zeros_like(out), torch.where(t < hi, out, torch.ones_like(out)))


def _truncated_mean(q: float, sigma: float, lo: float, hi: float, h: float) -> float:
    """E[Y] of Y truncated to [lo, hi]: hi − ∫_lo^hi F_T(t) dt, by Simpson's rule at h/2."""
    n = int(math.ceil((hi - lo) / (h / 2.0)))
    n += n % 2  # Simpson needs an even number of intervals
    t = torch.linspace(lo, hi, n + 1, dtype=_F64)
    f = _truncated_cdf(t, q, sigma, lo, hi)
    w = torch.ones(n + 1, dtype=_F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return hi - float((w * f).sum()) * (hi - lo) / n / 3.0


def _domain_half_width(history: Sequence[tuple], eps_error: float, delta_error: float) -> float:
    """L: the composed loss stays in [−L, L] but for δ_err/4, and one step's loss for δ_err/(8T)
    (GLW21 Remark 5.6, with RDP tail bounds, as the authors' code and Opacus do), plus 3."""
    total = sum(t for _, _, t in history)
    orders = _DOMAIN_ORDERS
    summed = [0.0] * len(orders)
    big = 0.0
    for sigma, q, steps in history:
        summed = [a + b for a, b in zip(summed, rdp(q, sigma, steps, orders))]
        big = max(big, epsilon_from_rdp(rdp(q, sigma, 1, orders), orders, delta_error / (8 * total))[0])
    big = max(big, epsilon_from_rdp(summed, orders, delta_error / 4)[0])
    return max(big, eps_error) + 3.0


def _power(z: torch.Tensor, n: int) -> torch.Tensor:
    """z**n for a complex tensor by repeated squaring (n ≥ 1)."""
    out, base = None, z
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    return out


def _composed(history: Sequence[tuple], eps_error: float, delta_error: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid t, pmf) of the sum of every step's discretised loss."""
    total = sum(t for _, _, t in history)
    half = _domain_half_width(history, eps_error, delta_error)
    h = eps_error / math.sqrt(total * math.log(12.0 / delta_error) / 2.0)
    i_min, i_max = math.floor(-half / h), math.ceil(half / h)
    n = i_max - i_min + 1
    n += n % 2
    lo, hi = i_min * h, (i_min + n - 1) * h
    t = lo + h * torch.arange(n, dtype=_F64)
    spectrum, shift = None, 0.0
    for sigma, q, steps in history:
        pmf = _truncated_cdf(t + h / 2, q, sigma, lo, hi) - _truncated_cdf(t - h / 2, q, sigma, lo, hi)
        s = _truncated_mean(q, sigma, lo, hi, h) - float(t @ pmf)
        if abs(s) >= h / 2:
            raise RuntimeError(f"PRV discretisation: the mean moved by {s:g}, more than half the mesh {h:g}")
        shift += steps * s
        part = _power(torch.fft.rfft(pmf), steps)
        spectrum = part if spectrum is None else spectrum * part
    # a sum of T grid points lo + k_i h is T·lo + K h: index K + (T − 1)·i_min on the same grid (mod n)
    pmf = torch.roll(torch.fft.irfft(spectrum, n=n), shifts=((total - 1) * i_min) % n)
    return t + shift, pmf


def _epsilon_at(t: torch.Tensor, pmf: torch.Tensor, delta: float) -> float:
    """The ε solving δ(ε) = Σ_{t_k ≥ ε} p_k (1 − e^{ε − t_k}) = ``delta`` on the grid."""
    d1 = pmf.flip(0).cumsum(0).flip(0)  # Σ_{j ≥ k} p_j
    d2 = (pmf * torch.exp(-t)).flip(0).cumsum(0).flip(0)  # Σ_{j ≥ k} p_j e^{−t_j}
    neg_delta = torch.exp(t) * d2 - d1  # −δ(t_k), increasing in k
    i = int(torch.searchsorted(neg_delta, torch.tensor([-delta], dtype=_F64), side="left"))
    if i <= 0 or i >= len(t):
        raise RuntimeError(f"PRV: delta={delta:g} is outside what the grid resolves")
    return math.log((float(d1[i]) - delta) / float(d2[i]))


def epsilon_bounds(history: Sequence[tuple], delta: float, eps_error: float = DEFAULT_EPS_ERROR,
                   delta_error: float | None = None) -> tuple[float, float, float]:
    """(lower, estimate, upper) of ε for ``history`` = [(σ, q, steps), ...] (validated by the
    caller): the true ε lies between lower and upper (GLW21 Thm 5.5)."""
    delta_error = delta / 1000.0 if delta_error is None else delta_error
    if sum(s for _, _, s in history) == 0:
        return 0.0, 0.0, 0.0
    if any(sigma == 0 for sigma, _, s in history if s):
        return math.inf, math.inf, math.inf
    history = [h for h in history if h[2]]
    t, pmf = _composed(history, eps_error, delta_error)
    if torch.finfo(_F64).eps * len(t) > delta - delta_error:
        raise ValueError(f"delta={delta:g} is too small for the PRV grid ({len(t)} points): rounding would dominate")
    return (_epsilon_at(t, pmf, delta + delta_error) - eps_error, _epsilon_at(t, pmf, delta),
            _epsilon_at(t, pmf, delta - delta_error) + eps_error)


def epsilon(history: Sequence[tuple], delta: float, eps_error: float = DEFAULT_EPS_ERROR,
            delta_error: float | None = None) -> float:
    """The upper bound of :func:`epsilon_bounds` (a guarantee, not an estimate), at least 0."""
    return max(epsilon_bounds(history, delta, eps_error, delta_error)[2], 0.0)
