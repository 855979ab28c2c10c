"""Gaps found by mutation testing (scripts/mutation.py) in the privacy accountants, second round:
the PRV grid against Opacus's construction step by step, PRV's rounding guard, GDP's μ where
e^{1/σ²} is large, and the boundary of gdp.mu_for."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from aam_func.privacy import gdp, prv

_EPS64 = torch.finfo(torch.float64).eps


def _opacus_dprv(monkeypatch, history, eps_error, delta_error):
    """Opacus's PRVAccountant pipeline (safe domain -> truncation -> discretisation -> FFT
    composition) on ``history``, with its RDP tail bound taken over prv's own orders: Remark 5.6
    holds for any orders, and these are the ones prv sizes its grid with."""
    accountants = pytest.importorskip("opacus.accountants", reason="opacus is not installed (the 'opacus' test extra)")
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    monkeypatch.setattr(accountants.RDPAccountant, "DEFAULT_ALPHAS", list(prv._DOMAIN_ORDERS))
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    half = compute_safe_domain_size(prvs, [steps for *_, steps in history], eps_error, delta_error)
    acc = accountants.PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return half, acc._get_dprv(eps_error, delta_error)


@pytest.mark.parametrize("history", [
    [(1.1, 0.02, 20)],
    [(2.0, 1.0, 10)],
    [(1.1, 0.02, 20), (0.9, 0.05, 10)],
])
def test_prv_grid_is_opacus_grid(monkeypatch, history):
    """GLW21's construction step by step, against Opacus's implementation of it: the truncation
    half-width L (the RDP tail bound of Remark 5.6, max'ed with ε_err, plus 3, as the authors'
    code and Opacus), the aligned grid (same size, same points after the mean shift), the
    composed pmf, and the three bounds. Measured: L to 1e-13 relative, points to 5e-9, pmf to
    3e-15, bounds to 5e-9. The existing parity tests compared the final ε to 1% only, so a
    domain 3 wider (a different truncation) passed them."""
    eps_error, delta = 0.01, 1e-5
    delta_error = delta / 1000
    half_ref, ref = _opacus_dprv(monkeypatch, history, eps_error, delta_error)
    assert prv._domain_half_width(history, eps_error, delta_error) == pytest.approx(half_ref, rel=1e-10)

    t, pmf = prv._composed(history, eps_error, delta_error)
    assert len(t) == ref.domain.size
    assert torch.allclose(t, torch.as_tensor(ref.domain.ts), rtol=0, atol=1e-7)
    assert torch.allclose(pmf, torch.as_tensor(ref.pmf), rtol=0, atol=1e-13)

    ours = prv.epsilon_bounds(history, delta, eps_error)
    theirs = ref.compute_epsilon(delta, delta_error, eps_error)
    assert ours == pytest.approx(tuple(float(x) for x in theirs), rel=0, abs=1e-7)


def test_prv_defaults_are_opacus_defaults(monkeypatch):
    """ε_err = 0.01 and δ_err = δ/1000 by default, as Opacus's PRVAccountant.get_epsilon: the
    public epsilon with no error arguments equals Opacus's get_epsilon with none (on the same
    tail-bound orders), to 1e-7; the existing parity (1% or DEFAULT_EPS_ERROR) could not see a
    doubled default."""
    accountants = pytest.importorskip("opacus.accountants", reason="opacus is not installed (the 'opacus' test extra)")
    monkeypatch.setattr(accountants.RDPAccountant, "DEFAULT_ALPHAS", list(prv._DOMAIN_ORDERS))
    history, delta = [(1.1, 0.02, 20)], 1e-5
    theirs = accountants.PRVAccountant()
    theirs.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.get_epsilon(delta)
    assert prv.epsilon(history, delta) == pytest.approx(expected, rel=0, abs=1e-7)

def test_prv_half_width_is_the_tail_bound_plus_three():
    """L = max(L_RDP, ε_err) + 3 (GLW21 Remark 5.6 as the authors' code): with an ε_err above
    the tail bound, L is exactly ε_err + 3; below it, L_RDP + 3 with L_RDP the larger of the
    composed bound at δ_err/4 and one step's at δ_err/(8T) (computed here from renyi)."""
    from aam_func.privacy.renyi import epsilon_from_rdp, rdp

    history, delta_error = [(4.0, 0.001, 2)], 1e-8
    orders = prv._DOMAIN_ORDERS
    composed = epsilon_from_rdp(rdp(0.001, 4.0, 2, orders), orders, delta_error / 4)[0]
    one = epsilon_from_rdp(rdp(0.001, 4.0, 1, orders), orders, delta_error / 16)[0]
    tail = max(composed, one)
    assert 0 < tail < 1.0
    assert prv._domain_half_width(history, 0.01, delta_error) == tail + 3.0
    assert prv._domain_half_width(history, 1.5, delta_error) == 1.5 + 3.0


def test_prv_refuses_a_delta_whose_lower_end_rounding_swamps():
    """The upper bound reads ε at δ − δ_err, so the rounding guard (n · float64 eps, the sum of
    n pmf entries' rounding) compares against δ − δ_err (GLW21's code and Opacus compare
    against delta - delta_error too): a δ whose δ − δ_err is below the rounding is refused with a
    clear error, even when δ itself is above it; twice the rounding is accepted."""
    history, eps_error, delta_error = [(1.0, 1.0, 1)], 0.01, 1e-10
    n = len(prv._composed(history, eps_error, delta_error)[0])
    rounding = _EPS64 * n
    assert delta_error > rounding  # so δ + δ_err would be above the rounding too
    with pytest.raises(ValueError, match="too small for the PRV grid"):
        prv.epsilon_bounds(history, delta_error + 0.5 * rounding, eps_error, delta_error)
    lower, estimate, upper = prv.epsilon_bounds(history, delta_error + 2.0 * rounding, eps_error, delta_error)
    assert math.isfinite(upper) and lower <= estimate <= upper


def test_prv_accepts_a_delta_whose_lower_end_equals_the_rounding_bound():
    """The guard refuses δ − δ_err *below* n · eps (strictly: 'rounding would dominate'); at
    equality the bounds are computed (Opacus's guard is the same strict '>'). δ_err = 2^-33 and
    n · eps are dyadic, so δ = δ_err + n · eps gives δ − δ_err == n · eps exactly."""
    history, eps_error, delta_error = [(1.0, 1.0, 1)], 0.01, 2.0**-33
    rounding = _EPS64 * len(prv._composed(history, eps_error, delta_error)[0])
    delta = delta_error + rounding
    assert delta - delta_error == rounding
    lower, estimate, upper = prv.epsilon_bounds(history, delta, eps_error, delta_error)
    assert math.isfinite(upper) and lower <= estimate <= upper


@pytest.mark.parametrize("inv_sigma2", [709.7, 705.0, 625.0, 400.0, 100.0, 11.0])
def test_gdp_mu_is_finite_while_e_to_the_one_over_sigma_squared_is_a_float(inv_sigma2):
    """μ = q √(T (e^{1/σ²} − 1)) is a finite float for every σ whose e^{1/σ²} is one (1/σ² up to
    float64's exp limit 709.78), and equals Opacus's compute_mu_poisson (the same formula in
    numpy) there, to 1e-12. mu used to return inf from 1/σ² > 700 on (a guard below the real
    overflow), so σ in [0.03754, 0.0378) got inf where Opacus's μ is finite."""
    analysis = pytest.importorskip("opacus.accountants.analysis.gdp", reason="opacus is not installed")
    q, steps, sigma = 0.01, 50, inv_sigma2**-0.5
    ours = gdp.mu([(sigma, q, steps)])
    assert math.isfinite(ours)
    assert ours == pytest.approx(analysis.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q),
                                 rel=1e-12)
    assert ours == pytest.approx(math.exp(math.log(q) + 0.5 * math.log(steps) + 0.5 * math.log(math.expm1(sigma**-2))),
                                 rel=1e-12)


def test_gdp_mu_is_inf_when_the_exponent_overflows():
    """1/σ² = 711 and 1111 (σ = 0.0375, 0.03): e^{1/σ²} overflows float64, so μ is inf (Opacus's
    numpy gives inf too), not an OverflowError, whatever the other entries; a zero-step entry is
    skipped whatever its σ."""
    for sigma in (711.0**-0.5, 0.03):
        assert gdp.mu([(sigma, 0.01, 50)]) == math.inf
        assert gdp.mu([(1.0, 0.1, 4), (sigma, 0.01, 50), (2.0, 0.1, 4)]) == math.inf
        assert gdp.epsilon([(sigma, 0.01, 50)], 1e-5) == math.inf
    assert gdp.mu([(0.03, 0.01, 0), (1.0, 0.1, 4)]) == pytest.approx(0.1 * math.sqrt(4 * math.expm1(1.0)))


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("m", [0.5, 1.0, 2.0, 4.0])
def test_gdp_mu_for_keeps_a_mu_that_spends_delta_exactly(eps, m):
    """mu_for returns the largest μ whose ε at δ is *at most* the target: a μ whose δ(ε) is
    exactly δ qualifies, so given that δ the answer is that μ or more (never just below it), and
    its δ(ε) is at most δ. μ on the search's own points (powers of two) is where an answer just
    below would show."""
    delta = gdp.delta_for(eps, m)
    assert 0 < delta < 1
    got = gdp.mu_for(eps, delta)
    assert got >= m
    assert gdp.delta_for(eps, got) <= delta
    assert got <= m * (1 + 1e-12)


# the orders prv's RDP tail bound is minimised over (proofs/privacy_accountants.md: "a short fixed
# list, which gives a valid, slightly wider bound at a fraction of the cost")
_TAIL_ORDERS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0)
# one history per regime; together each order above is the minimiser of some history's bound
_TAIL_HISTORIES = [
    [(0.5, 0.001, 10)], [(0.5, 0.001, 1000)], [(0.7, 0.001, 10)], [(1.5, 0.001, 100)], [(3.0, 0.001, 1)],
    [(0.5, 0.01, 100)], [(0.5, 0.01, 1000)], [(0.5, 0.1, 1000)], [(0.7, 0.5, 100)], [(1.0, 0.001, 1)],
    [(1.0, 0.01, 1)], [(1.5, 0.01, 1)], [(2.0, 0.1, 10)],
]


def test_prv_half_width_is_opacus_safe_domain_over_the_documented_orders(monkeypatch):
    """L is Opacus's compute_safe_domain_size with the RDP accountant's orders set to the
    documented short list, across regimes from ε ≈ 0.3 to ε ≈ 2500 in which every order of the
    list is the minimiser somewhere: the grid (its size, hence its time and its rounding) is the
    documented one. Changing the list is a design change to make here too, with its measured L
    (each one order dropped widens some L by 3-55% or narrows it)."""
    accountants = pytest.importorskip("opacus.accountants", reason="opacus is not installed (the 'opacus' test extra)")
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    monkeypatch.setattr(accountants.RDPAccountant, "DEFAULT_ALPHAS", list(_TAIL_ORDERS))
    delta_error = 1e-8
    for history in _TAIL_HISTORIES:
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the list is the point
            expected = compute_safe_domain_size(prvs, [steps for *_, steps in history], 0.01, delta_error)
        assert prv._domain_half_width(history, 0.01, delta_error) == pytest.approx(expected, rel=1e-9), history


def test_gdp_epsilon_searches_up_to_500_as_opacus():
    """ε is searched on [0, 500] (the bracket of Opacus's eps_from_mu and the proof note): a
    μ whose ε at δ lies below 500 gets it (471.0 at σ = 0.39, q = 1), one whose ε lies beyond
    (760.6 at σ = 0.375) gets inf rather than a number from a wider search."""
    below, beyond = [(0.39, 1.0, 1)], [(0.375, 1.0, 1)]
    assert gdp.epsilon(below, 1e-5) == pytest.approx(471.00454, rel=1e-7)
    assert gdp.delta_for(500.0, gdp.mu(beyond)) > 1e-5 > gdp.delta_for(1000.0, gdp.mu(beyond))
    assert gdp.epsilon(beyond, 1e-5) == math.inf


def test_gdp_epsilon_at_the_ends_of_its_bracket():
    """The bracket [0, 500] is closed at both ends: a δ that μ-GDP reaches exactly at ε = 0
    gives ε = 0 (not a bisection's 1e-13), and one it reaches exactly at ε = 500 gives 500 (not
    inf)."""
    history = [(0.39, 1.0, 1)]
    m = gdp.mu(history)
    assert gdp.epsilon(history, gdp.delta_for(0.0, m)) == 0.0
    assert gdp.epsilon(history, gdp.delta_for(500.0, m)) == 500.0


def test_prv_refuses_a_delta_above_what_the_grid_resolves_as_opacus():
    """δ(ε) on the grid is at most δ(t_0), its value at the grid's left end −L (about 1 − e^{−L});
    a δ above it has no ε on the grid, and epsilon_bounds raises (Opacus's compute_epsilon
    raises "Cannot compute epsilon" for the same input) rather than read an ε off the end of the
    grid. δ = 0.9 is still resolved: ε < 0 there, which epsilon clamps at 0."""
    history = [(5.0, 0.01, 1)]
    with pytest.raises(RuntimeError, match="outside what the grid resolves"):
        prv.epsilon_bounds(history, 0.99)
    lower, estimate, upper = prv.epsilon_bounds(history, 0.9)
    assert lower < estimate < upper < 0 and prv.epsilon(history, 0.9) == 0.0


def test_gdp_log_phi_is_scipy_log_ndtr_in_both_branches():
    """log Φ(x), which δ(ε) of μ-GDP is built from, equals scipy.special.log_ndtr to 1e-14
    (relative, or absolute below 1) from x = −1500 to 8: erfc's log where erfc is a float, and
    the asymptotic series (four terms) where it underflows (x ≤ −25√2). Measured 1.1e-15; the
    series' last term alone is 7e-14 of log Φ just past the switch."""
    special = pytest.importorskip("scipy.special", reason="scipy is not installed (an Opacus dependency)")
    xs = [-1500.0, -400.0, -100.0, -50.0, -40.0, -37.0, -36.0, -35.5, -35.4, -35.3, -30.0, -10.0, -1.0, 0.0, 2.0, 8.0]
    for x in xs:
        ref = float(special.log_ndtr(x))
        assert abs(gdp._log_phi(x) - ref) <= 1e-14 * max(1.0, abs(ref)), x


def test_gdp_mu_for_stops_at_a_bracket_exactly_1e13_wide(monkeypatch):
    """mu_for bisects until hi − lo ≤ 1e-13·hi, that bound included. A bracket can be exactly
    that wide: from [1, 2], 43 halvings leave 2^-43, which is 1e-13·hi for hi = 5^13·2^-30
    (1e13·2^-43 is a dyadic number). With the root just inside that bracket the search stops
    there: 2 evaluations to bracket μ, 43 to narrow it, none more, and it returns the bracket's
    lower end."""
    hi = 5**13 * 2.0**-30
    assert 1e-13 * hi == 2.0**-43
    delta = gdp.delta_for(1.0, hi - 2.0**-44)
    calls = []
    original = gdp.delta_for

    def spy(eps, mu_):
        calls.append(mu_)
        return original(eps, mu_)

    monkeypatch.setattr(gdp, "delta_for", spy)
    got = gdp.mu_for(1.0, delta)
    assert len(calls) == 2 + 43
    assert got == hi - 2.0**-43


@pytest.mark.parametrize("name", ["rdp", "gdp", "prv"])
def test_noise_for_refuses_a_budget_spent_exactly(name):
    """A history that has spent exactly target_epsilon has nothing left for more steps (every
    step with finite noise adds to ε): noise_for says the budget is already spent, as for a
    history past the target, instead of searching σ up to 1e6 for a room of zero."""
    from aam_func import privacy as P

    acc = P.accountant(name).step(1.0, 0.05, 20)
    spent = acc.epsilon(1e-5)
    assert spent > 0
    with pytest.raises(ValueError, match="privacy budget is already spent"):
        acc.noise_for(spent, 0.05, 10, 1e-5)


def test_rdp_default_orders_are_opacus_default_alphas():
    """renyi.DEFAULT_ORDERS is Opacus's RDPAccountant.DEFAULT_ALPHAS (1.1, 1.2, ..., 10.9, then
    12, ..., 63), as its comment says: the same orders give the same ε, which the RDP parity with
    Opacus (1%) could not tell from a shifted or shortened list."""
    accountants = pytest.importorskip("opacus.accountants", reason="opacus is not installed (the 'opacus' test extra)")
    from aam_func.privacy import renyi

    assert list(renyi.DEFAULT_ORDERS) == list(accountants.RDPAccountant.DEFAULT_ALPHAS)


def test_smallest_noise_searches_sigma_up_to_1e6_included():
    """The search grows σ up to 1e6, as its error says, and 1e6 itself is searched: an ε that
    meets the target only from σ = 1e6 gets an answer in (5e5, 1e6] (from start = 1e6/2^10 the
    doubling lands on 1e6 exactly); one that meets it only from 1.04e6 (< 2^20, the next doubling
    from 1) is refused by name."""
    from aam_func.privacy.search import smallest_noise

    sigma = smallest_noise(lambda s: 0.0 if s >= 1e6 else 1.0, 0.5, 1e-6, "a step at 1e6", start=1e6 / 2**10)
    assert 1e6 * (1 - 2e-6) <= sigma <= 1e6
    with pytest.raises(ValueError, match="no noise_multiplier up to 1e6 reaches"):
        smallest_noise(lambda s: 0.0 if s >= 1.04e6 else 1.0, 0.5, 1e-6, "a step at 1.04e6")


@pytest.mark.parametrize("start", [1.0, 1e-6 * 2**10])
def test_smallest_noise_for_a_target_any_sigma_meets_is_below_1e_minus_6(start):
    """When every σ meets the target (no noise needed), the search halves σ until it is below
    1e-6 and returns that, a σ under 1e-6 (from start = 1e-6·2^10 the halving passes through 1e-6
    exactly, which is not yet below it)."""
    from aam_func.privacy.search import smallest_noise

    sigma = smallest_noise(lambda s: 0.0, 1.0, 1e-6, "no noise needed", start=start)
    assert 0 < sigma < 1e-6
    assert sigma >= 0.25e-6


def test_gdp_epsilon_stops_at_a_bracket_exactly_1e12_wide(monkeypatch):
    """gdp.epsilon bisects [0, 500] until hi − lo ≤ 1e-12·max(1, hi), that bound included. After
    40 halvings the bracket is 500·2^-40 wide, exactly 1e-12·hi for hi = 5^15·2^-26 ≈ 454.75;
    with the root just inside that bracket the search stops there: δ(0) and δ(500) to start,
    40 halvings, none more, and it returns hi (never below the root)."""
    hi, width = 5**15 * 2.0**-26, 500 * 2.0**-40
    assert 1e-12 * hi == width
    history = [(0.39, 1.0, 1)]
    delta = gdp.delta_for(hi - width / 2, gdp.mu(history))
    calls = []
    original = gdp.delta_for

    def spy(eps, mu_):
        calls.append(eps)
        return original(eps, mu_)

    monkeypatch.setattr(gdp, "delta_for", spy)
    assert gdp.epsilon(history, delta) == hi
    assert len(calls) == 2 + 40


def test_smallest_noise_stops_at_a_bracket_exactly_rtol_wide():
    """smallest_noise bisects until hi − lo ≤ rtol·hi, that bound included: with rtol = 2^-10
    and the bracket [0.5, 1], nine halvings toward 1 leave [1 − 2^-10, 1], exactly rtol·hi wide,
    so the search returns hi = 1 after eps(1), eps(0.5) and nine midpoints, none more."""
    from aam_func.privacy.search import smallest_noise

    calls = []

    def eps(sigma):
        calls.append(sigma)
        return 1.0 if sigma < 1 - 2.0**-11 else 0.0

    assert smallest_noise(eps, 0.5, 2.0**-10, "a step just below 1") == 1.0
    assert len(calls) == 2 + 9
