"""The PRV and GDP accountants and the common interface: parity with Opacus on a grid, exact cases,
the inverse (noise_for), histories, and bad input."""

import math
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from aam_func import privacy as P
from aam_func.privacy import gdp, prv


def opacus_epsilon(kind, sigma, q, steps, delta):
    accountants = pytest.importorskip("opacus.accountants", reason="opacus is not installed (the 'opacus' test extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = {"prv": accountants.PRVAccountant, "gdp": accountants.GaussianAccountant}[kind]()
        acc.history = [(sigma, q, steps)]
        return acc.get_epsilon(delta)


FAST_GRID = [(0.8, 0.1, 100), (1.1, 0.01, 1000), (2.0, 0.001, 1), (1.1, 0.1, 1), (0.6, 1.0, 10)]
FULL_GRID = [(s, q, t) for s in (0.7, 1.1, 2.0) for q in (0.001, 0.01, 0.1) for t in (1, 100, 1000)]


def _check_prv(sigma, q, steps, delta):
    theirs = opacus_epsilon("prv", sigma, q, steps, delta)
    lower, estimate, upper = prv.epsilon_bounds([(sigma, q, steps)], delta)
    # Opacus returns its upper bound; ours must agree within 1% or within the bound's own width
    assert upper == pytest.approx(theirs, rel=0.01, abs=prv.DEFAULT_EPS_ERROR)
    assert lower <= estimate <= upper and upper - lower <= 2 * prv.DEFAULT_EPS_ERROR + 0.05


@pytest.mark.parametrize("sigma, q, steps", FAST_GRID)
def test_prv_matches_opacus(sigma, q, steps):
    _check_prv(sigma, q, steps, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
@pytest.mark.parametrize("sigma, q, steps", FULL_GRID)
def test_prv_matches_opacus_on_the_full_grid(sigma, q, steps, delta):
    _check_prv(sigma, q, steps, delta)


@pytest.mark.parametrize("delta", [1e-6, 1e-5, 1e-3])
@pytest.mark.parametrize("sigma, q, steps", FULL_GRID + [(0.6, 1.0, 10), (5.0, 0.5, 20)])
def test_gdp_matches_opacus(sigma, q, steps, delta):
    ours = P.epsilon_for("gdp", steps, q, sigma, delta)
    if ours == 0.0:  # δ(0) ≤ δ: Opacus's root bracket has no sign change there, so compare δ(0) instead
        assert gdp.delta_for(0.0, gdp.mu([(sigma, q, steps)])) <= delta
        return
    assert ours == pytest.approx(opacus_epsilon("gdp", sigma, q, steps, delta), rel=0.01)


def test_gdp_mu_is_the_clt_formula_and_adds_in_squares():
    assert gdp.mu([(1.1, 0.01, 1000)]) == pytest.approx(0.01 * math.sqrt(1000 * math.expm1(1 / 1.21)))
    a, b = (1.0, 0.02, 300), (2.0, 0.05, 700)
    assert gdp.mu([a, b]) ** 2 == pytest.approx(gdp.mu([a]) ** 2 + gdp.mu([b]) ** 2)


def gaussian_mechanism_epsilon(mu, delta):
    """The exact ε of the Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018): δ(ε) of μ-GDP."""
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp.delta_for(mid, mu) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_prv_brackets_the_exact_gaussian_mechanism(sigma, steps):
    # q = 1: T Gaussian steps are exactly (√T/σ)-GDP, so the truth is known; PRV's bounds hold it
    exact = gaussian_mechanism_epsilon(math.sqrt(steps) / sigma, 1e-5)
    lower, estimate, upper = prv.epsilon_bounds([(sigma, 1.0, steps)], 1e-5)
    assert lower <= exact <= upper
    assert estimate == pytest.approx(exact, abs=2e-3)


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 1000), (0.8, 0.1, 100), (2.0, 0.05, 500)])
def test_prv_is_tighter_than_rdp(sigma, q, steps):
    assert P.epsilon_for("prv", steps, q, sigma, 1e-5) < P.epsilon_for("rdp", steps, q, sigma, 1e-5)


def test_rdp_accountant_is_the_rdp_functions():
    acc = P.accountant("rdp").step(1.1, 0.01, 400).step(0.9, 0.02, 100)
    orders = P.DEFAULT_ORDERS
    total = [a + b for a, b in zip(P.rdp(0.01, 1.1, 400), P.rdp(0.02, 0.9, 100))]
    assert acc.epsilon(1e-5) == P.epsilon_from_rdp(total, orders, 1e-5)[0]
    assert P.epsilon_for("rdp", 1000, 0.004, 1.1, 1e-5) == P.epsilon(1000, 0.004, 1.1, 1e-5)


def test_prv_composes_a_mixed_history_like_opacus():
    accountants = pytest.importorskip("opacus.accountants")
    theirs = accountants.PRVAccountant()
    theirs.history = [(1.1, 0.01, 300), (0.9, 0.02, 100)]
    ours = P.accountant("prv").step(1.1, 0.01, 300).step(0.9, 0.02, 100).epsilon(1e-5)
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=0.01)


def test_step_extends_the_last_entry_and_is_pure():
    a = P.accountant("gdp")
    b = a.step(1.0, 0.01, 10)
    c = b.step(1.0, 0.01, 5).step(2.0, 0.01, 0)
    assert a.history == () and b.history == ((1.0, 0.01, 10),) and c.history == ((1.0, 0.01, 15),)
    assert c.steps == 15 and P.accountant("prv", c.history).history == c.history


@pytest.mark.parametrize("name", P.ACCOUNTANTS)
def test_zero_steps_and_zero_noise(name):
    acc = P.accountant(name)
    assert acc.epsilon(1e-5) == 0.0
    assert acc.step(0.0, 0.1, 3).epsilon(1e-5) == math.inf


@pytest.mark.parametrize("name, target, q, steps", [
    ("rdp", 2.0, 0.01, 1000), ("gdp", 2.0, 0.01, 1000), ("prv", 2.0, 0.05, 50),
    ("rdp", 0.5, 0.1, 50), ("gdp", 8.0, 0.001, 10_000),
    pytest.param("prv", 8.0, 0.1, 20, marks=pytest.mark.slow),
])
def test_noise_for_inverts_epsilon(name, target, q, steps):
    acc = P.accountant(name)
    sigma = acc.noise_for(target, q, steps, 1e-5)
    assert acc.step(sigma, q, steps).epsilon(1e-5) <= target
    # and it is the smallest such σ, to the search's tolerance
    assert acc.step(sigma * (1 - 3e-3), q, steps).epsilon(1e-5) > target


@settings(max_examples=6, deadline=None)
@given(target=st.floats(0.3, 20.0), q=st.floats(1e-3, 0.3), steps=st.integers(1, 3000),
       delta=st.sampled_from([1e-6, 1e-5, 1e-4]), name=st.sampled_from(["rdp", "gdp"]))
def test_noise_for_inverts_epsilon_anywhere(target, q, steps, delta, name):
    acc = P.accountant(name)
    sigma = acc.noise_for(target, q, steps, delta)
    assert acc.step(sigma, q, steps).epsilon(delta) <= target * (1 + 1e-9)
    assert acc.step(sigma * (1 - 3e-3), q, steps).epsilon(delta) > target


def test_noise_for_counts_the_history_and_refuses_a_spent_budget():
    acc = P.accountant("rdp").step(1.0, 0.01, 500)
    spent = acc.epsilon(1e-5)
    sigma = acc.noise_for(spent + 1.0, 0.01, 500, 1e-5)
    assert acc.step(sigma, 0.01, 500).epsilon(1e-5) <= spent + 1.0
    with pytest.raises(ValueError, match="already spent"):
        acc.noise_for(spent * 0.9, 0.01, 100, 1e-5)
    g = P.accountant("gdp").step(1.0, 0.01, 500)
    sigma = g.noise_for(g.epsilon(1e-5) + 1.0, 0.01, 500, 1e-5)
    assert g.step(sigma, 0.01, 500).epsilon(1e-5) == pytest.approx(g.epsilon(1e-5) + 1.0, rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: P.accountant("moments"), "accountant"),
    (lambda: P.accountant("rdp").step(-1.0, 0.1), "noise_multiplier"),
    (lambda: P.accountant("rdp").step(1.0, 0.0), "sample_rate"),
    (lambda: P.accountant("rdp").step(1.0, 1.5), "sample_rate"),
    (lambda: P.accountant("rdp").step(1.0, 0.1, -1), "steps"),
    (lambda: P.accountant("prv").epsilon(1.0), "delta"),
    (lambda: P.accountant("gdp").epsilon(0.0), "delta"),
    (lambda: P.accountant("prv").noise_for(0.0, 0.1, 10, 1e-5), "target_epsilon"),
    (lambda: P.accountant("gdp").noise_for(-1.0, 0.1, 10, 1e-5), "target_epsilon"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
