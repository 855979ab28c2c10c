"""RDP accountant of the sampled Gaussian mechanism: against numerical integration, closed forms,
Opacus (when installed), monotonicity, inversion, and bad input."""

import math
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

from aam_func import privacy as P


def numeric_log_a(q, sigma, alpha):
    """log A_α = log ∫ μ0(z) ((1 − q) + q μ1(z)/μ0(z))^α dz by the trapezoid rule in float64."""
    z = torch.linspace(-40 * sigma - 10, 40 * sigma + 10, 400_001, dtype=torch.float64)
    log_mu0 = -z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * torch.exp((2 * z - 1) / (2 * sigma**2))  # μ1/μ0 = exp((2z − 1)/2σ²)
    log_f = log_mu0 + alpha * torch.log(ratio)
    m = log_f.max()
    return (m + torch.log(torch.trapezoid(torch.exp(log_f - m), z))).item()


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.1, 0.8), (0.3, 2.0), (0.02, 5.0)])
@pytest.mark.parametrize("alpha", [2, 5, 13, 1.5, 3.7, 10.25])
def test_rdp_equals_the_defining_integral(q, sigma, alpha):
    ours = P.rdp(q, sigma, 1, [alpha])[0]
    expected = numeric_log_a(q, sigma, alpha) / (alpha - 1)
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-10)


def test_full_batch_is_the_gaussian_mechanism():
    for alpha in (1.5, 2, 7.3, 40):
        assert P.rdp(1.0, 1.7, 3, [alpha])[0] == pytest.approx(3 * alpha / (2 * 1.7**2))
    # Gaussian mechanism, q = 1: ε = min_α α/2σ² + log((α−1)/α) − (log δ + log α)/(α−1)
    sigma, delta = 2.0, 1e-5
    orders = P.DEFAULT_ORDERS
    expected = min(a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders)
    assert P.epsilon(1, 1.0, sigma, delta) == pytest.approx(expected)


def test_tf_privacy_docstring_example():
    # the composition example of TF Privacy's/Opacus's rdp module: ε ≈ 0.336 at order 23 for δ = 1e-5
    orders = list(range(2, 33))
    total = [a + b for a, b in zip(P.rdp(1e-5, 1.0, 10, orders), P.rdp(1e-4, 3.0, 4, orders))]
    eps, order = P.epsilon_from_rdp(total, orders, 1e-5)
    assert eps == pytest.approx(0.336, abs=5e-4) and order == 23


GRID = [
    (q, s, steps, d)
    for q in (0.001, 0.01, 0.1, 1.0)
    for s in (0.6, 1.1, 3.0)
    for steps in (1, 1000)
    for d in (1e-5, 1e-3)
]


@pytest.mark.parametrize("q, sigma, steps, delta", GRID)
def test_epsilon_within_one_percent_of_opacus(q, sigma, steps, delta):
    pytest.importorskip("opacus", reason="opacus is not installed (pip install opacus: the 'opacus' test extra)")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = acc.get_epsilon(delta)
    ours = P.epsilon(steps, q, sigma, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


@given(
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.5, 10.0),
    steps=st.integers(1, 5000),
    delta=st.sampled_from([1e-6, 1e-5, 1e-3]),
)
def test_epsilon_is_monotone(q, sigma, steps, delta):
    e = P.epsilon(steps, q, sigma, delta)
    assert e >= 0
    assert P.epsilon(steps, q, sigma * 1.5, delta) <= e + 1e-12  # more noise, less loss
    assert P.epsilon(steps * 2, q, sigma, delta) >= e - 1e-12  # more steps, more loss
    assert P.epsilon(steps, q, sigma, delta * 10) <= e + 1e-12  # larger δ, smaller ε


@pytest.mark.parametrize("target, steps, q, delta", [(1.0, 1000, 0.01, 1e-5), (8.0, 100, 0.1, 1e-5), (0.5, 10, 0.001, 1e-6), (3.0, 5, 1.0, 1e-5)])
def test_noise_multiplier_for_inverts_epsilon(target, steps, q, delta):
    sigma = P.noise_multiplier_for(target, steps, q, delta, rtol=1e-6)
    assert P.epsilon(steps, q, sigma, delta) <= target
    assert P.epsilon(steps, q, sigma * (1 - 1e-4), delta) > target  # the smallest such σ
    assert P.epsilon(steps, q, sigma, delta) == pytest.approx(target, rel=1e-3)


def test_edge_values():
    assert P.epsilon(0, 0.1, 1.0, 1e-5) == 0.0
    assert P.epsilon(10, 0.1, 0.0, 1e-5) == math.inf
    assert P.noise_multiplier_for(1.0, 0, 0.1, 1e-5) == 0.0


def test_bad_inputs_give_clear_errors():
    for d in (0.0, 1.0, -1e-5, 2.0):
        with pytest.raises(ValueError, match="delta"):
            P.epsilon(10, 0.1, 1.0, d)
        with pytest.raises(ValueError, match="delta"):
            P.noise_multiplier_for(1.0, 10, 0.1, d)
    for q in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="sample_rate"):
            P.epsilon(10, q, 1.0, 1e-5)
        with pytest.raises(ValueError, match="sample_rate"):
            P.noise_multiplier_for(1.0, 10, q, 1e-5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        P.epsilon(10, 0.1, -1.0, 1e-5)
    with pytest.raises(ValueError, match="steps"):
        P.epsilon(-1, 0.1, 1.0, 1e-5)
    with pytest.raises(ValueError, match="steps"):
        P.epsilon(1.5, 0.1, 1.0, 1e-5)
    with pytest.raises(ValueError, match="orders"):
        P.epsilon(10, 0.1, 1.0, 1e-5, orders=[1.0, 2.0])
    with pytest.raises(ValueError, match="target_epsilon"):
        P.noise_multiplier_for(0.0, 10, 0.1, 1e-5)
    with pytest.raises(ValueError, match="RDP values"):
        P.epsilon_from_rdp([1.0], [2.0, 3.0], 1e-5)
