"""One interface over the three accountants of DP-SGD's Poisson-subsampled Gaussian mechanism.

An :class:`Accountant` is an immutable history of steps ``(noise_multiplier, sample_rate,
steps)``; ``step`` returns a new one with more steps, ``epsilon(delta)`` the privacy spent, and
``noise_for`` the smallest σ that keeps a planned number of further steps within a target ε::

    acc = accountant("prv")
    sigma = acc.noise_for(target_epsilon=3.0, sample_rate=0.01, steps=2000, delta=1e-5)
    acc = acc.step(sigma, 0.01, steps=500)
    acc.epsilon(1e-5)            # ε after 500 of the 2000 steps

``rdp``: Rényi DP of the sampled Gaussian mechanism (:mod:`.renyi`), a guarantee, loose by a few
percent. ``prv``: privacy-loss random variables composed by FFT (:mod:`.prv`), the tightest
guarantee (an upper bound within ``eps_error`` = 0.01 of the truth). ``gdp``: μ-GDP by the
Poisson-subsampling CLT (:mod:`.gdp`), an approximation that can underestimate ε for few steps.
Everything is plain float math over plain numbers; validation errors name the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_choice, check_int, check_number
from . import gdp as _gdp
from . import prv as _prv
from . import renyi as _renyi
from .search import smallest_noise

__all__ = ["ACCOUNTANTS", "Accountant", "accountant", "epsilon_for"]

ACCOUNTANTS = ("rdp", "prv", "gdp")


def _check_step(noise_multiplier, sample_rate, steps) -> tuple[float, float, int]:
    return (check_number("noise_multiplier", noise_multiplier, min=0),
            check_number("sample_rate", sample_rate, min=0, min_open=True, max=1),
            check_int("steps", steps, min=0))


def _check_delta(delta) -> float:
    return check_number("delta", delta, min=0, min_open=True, max=1, max_open=True)


def _epsilon(name: str, history: tuple, delta: float) -> float:
    if sum(s for _, _, s in history) == 0:
        return 0.0  # nothing released
    if name == "rdp":
        orders = _renyi.DEFAULT_ORDERS
        total = [0.0] * len(orders)
        for sigma, q, steps in history:
            total = [a + b for a, b in zip(total, _renyi.rdp(q, sigma, steps, orders))]
        return _renyi.epsilon_from_rdp(total, orders, delta)[0]
    if name == "prv":
        return _prv.epsilon(history, delta)
    return _gdp.epsilon(history, delta)


@dataclass(frozen=True)
class Accountant:
    """A history of DP-SGD steps under accountant ``name`` (one of :data:`ACCOUNTANTS`)."""

    name: str = "rdp"
    history: tuple = ()

    def __post_init__(self) -> None:
        check_choice("accountant", self.name, ACCOUNTANTS)
        object.__setattr__(self, "history", tuple(tuple(_check_step(*h)) for h in self.history))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> "Accountant":
        """This history followed by ``steps`` steps at (σ, q); the same (σ, q) as the last entry
        extends it."""
        entry = _check_step(noise_multiplier, sample_rate, steps)
        hist = list(self.history)
        if hist and hist[-1][:2] == entry[:2]:
            hist[-1] = (entry[0], entry[1], hist[-1][2] + entry[2])
        elif entry[2]:
            hist.append(entry)
        return Accountant(self.name, tuple(hist))

    def epsilon(self, delta: float) -> float:
        """ε spent at ``delta`` (0 after no steps, inf when a step had no noise)."""
        return _epsilon(self.name, self.history, _check_delta(delta))

    def noise_for(self, target_epsilon: float, sample_rate: float, steps: int, delta: float, *,
                  rtol: float = 1e-3) -> float:
        """The smallest σ (to relative ``rtol``; exact for ``gdp``) such that ``steps`` more steps
        at ``sample_rate`` after this history spend at most ``target_epsilon`` at ``delta``. A
        budget this history already spent is an error."""
        check_number("target_epsilon", target_epsilon, min=0, min_open=True)
        _, q, steps = _check_step(1.0, sample_rate, steps)
        delta = _check_delta(delta)
        spent = self.epsilon(delta)
        if spent >= target_epsilon:
            raise ValueError(f"the privacy budget is already spent: epsilon {spent:.4g} of target_epsilon "
                             f"{target_epsilon:g} after {self.steps} steps")
        if steps == 0:
            return 0.0
        if self.name == "gdp":
            sigma = _gdp.noise_for_mu(_gdp.mu_for(target_epsilon, delta), q, steps, _gdp.mu(self.history))
            while self.step(sigma, q, steps).epsilon(delta) > target_epsilon:  # rounding of the closed form
                sigma *= 1.0 + 1e-9
            return sigma
        what = f"accountant={self.name}, steps={steps}, sample_rate={q}, delta={delta}"
        if self.name == "prv":  # start from RDP's σ, which PRV's (tighter) answer rarely exceeds: fewer FFTs
            start = Accountant("rdp", self.history).noise_for(target_epsilon, q, steps, delta, rtol=1e-2)
            return smallest_noise(lambda s: self.step(s, q, steps).epsilon(delta), target_epsilon, rtol, what,
                                  start=start, ratio=0.9)
        return smallest_noise(lambda s: self.step(s, q, steps).epsilon(delta), target_epsilon, rtol, what)


def accountant(name: str = "rdp", history=()) -> Accountant:
    """A fresh accountant ``name`` ("rdp", "prv" or "gdp"), or one holding ``history``."""
    return Accountant(name, tuple(history))


def epsilon_for(name: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float) -> float:
    """ε after ``steps`` steps at (q, σ) under accountant ``name`` (a one-line form of
    ``accountant(name).step(σ, q, steps).epsilon(delta)``)."""
    return accountant(name).step(noise_multiplier, sample_rate, steps).epsilon(delta)

