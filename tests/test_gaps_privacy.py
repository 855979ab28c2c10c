"""Gaps found by mutation testing (scripts/mutation.py) in the privacy accountants."""

from __future__ import annotations

import pytest

from aam_func import privacy as P
from aam_func.privacy import gdp


@pytest.mark.parametrize("sigma0, q, steps, delta", [
    (0.7, 0.01, 10, 1e-5), (1.3, 0.1, 100, 1e-6), (3.7, 1.0, 1, 1e-5), (2.0, 0.1, 10, 1e-6),
])
def test_gdp_noise_for_is_exact(sigma0, q, steps, delta):
    """'exact for gdp': noise_for returns the closed form's σ whenever that σ spends at most the
    target (also when it spends the target exactly), and only otherwise a nudge above it that
    fits. The existing tests checked the answer to 3e-3 only; a mutant that nudged σ also when
    it spent the target exactly survived them."""
    acc = P.accountant("gdp")
    target = acc.step(sigma0, q, steps).epsilon(delta)
    sigma = acc.noise_for(target, q, steps, delta)
    closed = gdp.noise_for_mu(gdp.mu_for(target, delta), q, steps)
    eps = lambda s: acc.step(s, q, steps).epsilon(delta)  # noqa: E731
    assert eps(sigma) <= target
    if eps(closed) <= target:
        assert sigma == closed
    else:
        assert closed < sigma
    assert abs(sigma / sigma0 - 1) < 2e-9


def test_smallest_noise_stops_at_the_left_end_of_a_flat_epsilon():
    """ε may sit exactly at the target over a range of σ (a flat stretch of a min over orders or
    of a discretized PRV): the smallest σ that meets the target is the range's left end. A
    mutant whose bisection treated ε == target as 'over the target' returned the right end
    (1.0 here, from the bracket [0.5, 1]) and survived the suite."""
    from aam_func.privacy.search import smallest_noise

    def eps(sigma):
        return 2.0 if sigma < 0.7 else 1.0 if sigma < 3.0 else 0.5

    sigma = smallest_noise(eps, 1.0, 1e-6, "a flat test epsilon", start=8.0)
    assert eps(sigma) <= 1.0
    assert 0.7 <= sigma <= 0.7 * (1 + 2e-6)


def test_smallest_noise_finds_a_target_that_epsilon_reaches_and_keeps():
    """ε may come down to the target and stay there (a floor) rather than go below it: σ where it
    first reaches the target is the answer. A mutant whose growing phase waited for ε < target
    grew past 1e6 and raised 'no noise_multiplier reaches', and survived the suite."""
    from aam_func.privacy.search import smallest_noise

    sigma = smallest_noise(lambda s: max(1.0, 3.0 - s), 1.0, 1e-6, "an epsilon with a floor")
    assert 2.0 <= sigma <= 2.0 * (1 + 2e-6)


def test_gdp_epsilon_is_the_root_to_1e12_and_never_below_it():
    """gdp's ε at δ is the root of δ(ε) = δ from above, to 1e-12 relative (the bisection's stop):
    δ(ε) ≤ δ (never an understated ε), and ε − 1e-12·max(1, ε) already gives δ(·) > δ. A mutant
    that stopped at 2e-12 survived the suite."""
    for sigma, q, steps in [(1.0, 0.1, 100), (0.8, 0.05, 1000), (2.0, 0.2, 300), (1.5, 1.0, 1), (0.6, 1.0, 1)]:
        history = [(sigma, q, steps)]
        m = gdp.mu(history)
        for delta in (1e-5, 1e-6):
            e = gdp.epsilon(history, delta)
            assert 0.0 < e < 100.0
            assert gdp.delta_for(e, m) <= delta
            assert gdp.delta_for(e - 1e-12 * max(1.0, e), m) > delta, (sigma, q, steps, delta)


def test_an_accountant_is_immutable():
    """The module's word: an Accountant is an immutable history. Its fields cannot be set, it
    hashes (so it can key a cache), and step() leaves it as it was. A mutant that dropped
    frozen=True survived the suite."""
    import dataclasses

    acc = P.accountant("rdp")
    later = acc.step(1.0, 0.01, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        acc.history = later.history
    assert acc.steps == 0 and later.steps == 10
    assert {later: 1}[P.accountant("rdp").step(1.0, 0.01, 10)] == 1
