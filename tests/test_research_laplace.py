"""Laplace: exact evidence on a linear-Gaussian model, KFAC/diag/last-layer posteriors against
dense ones in float64, prior tuning and the linearised predictive."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aam_func as af
from aam_func.research import Problem, laplace as lp
from aam_func.research.spectral import Flat

D = torch.float64


def test_marginal_likelihood_is_exact_for_bayesian_linear_regression():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, 1, generator=g, dtype=D)
    problem = Problem(lambda p, x: F.linear(x, p["w"]), loss="mse", reduction="sum")
    for delta in (0.3, 2.0):
        w = torch.linalg.solve(2 * X.t() @ X + delta * torch.eye(3, dtype=D), 2 * X.t() @ y).t()  # the MAP
        # evidence: y ~ N(0, X Xᵀ / δ + ½ I) (likelihood variance ½: ℓ = (f - y)²)
        cov = X @ X.t() / delta + 0.5 * torch.eye(20, dtype=D)
        exact = torch.distributions.MultivariateNormal(torch.zeros(20, dtype=D), cov).log_prob(y[:, 0])
        for kind in ("last_layer", "kfac"):  # both hold the full 3x3 block (diag would drop XᵀX's off-diagonal)
            post = lp.laplace(problem, {"w": w}, X, y, kind=kind, prior_precision=delta)
            torch.testing.assert_close(torch.as_tensor(post.log_marginal_likelihood(), dtype=D), exact,
                                       atol=1e-9, rtol=1e-9)


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    x, y = torch.randn(10, 4, dtype=D), torch.randint(0, 3, (10,))
    apply, params, _ = af.nn.functionalize(model)
    return Problem(lambda p, xx: apply(p, {}, xx)[0]), params, x, y


def test_diag_and_last_layer_posteriors_match_dense():
    problem, params, x, y = small()
    flat = Flat(params)
    f = lambda t: problem.apply(flat.tree(t), x)  # noqa: E731
    out = f(flat.vec(params))
    J = torch.func.jacrev(f)(flat.vec(params)).reshape(out.numel(), -1)
    Hf = torch.func.hessian(lambda o: problem.loss_value(o.reshape(out.shape), y, 1.0))(out.reshape(-1))
    G = J.t() @ Hf @ J  # the summed loss's GGN
    post = lp.laplace(problem, params, x, y, kind="diag", prior_precision=0.5)
    torch.testing.assert_close(post.precision_eigs(), torch.diagonal(G) + 0.5, atol=1e-10, rtol=1e-9)
    ll = lp.laplace(problem, params, x, y, kind="last_layer", prior_precision=0.5)
    assert ll.names == ("2.weight", "2.bias")
    idx = torch.arange(flat.size)[-(15 + 3):]  # the last layer's leaves come last
    torch.testing.assert_close(ll.curv, G[idx][:, idx], atol=1e-10, rtol=1e-9)
    # exact output covariance J Σ Jᵀ against dense
    cov = lp.output_covariance(ll, x[:2])
    Jl = J.reshape(10, 3, -1)[:2][:, :, idx]
    Sigma = torch.linalg.inv(G[idx][:, idx] + 0.5 * torch.eye(18, dtype=D))
    torch.testing.assert_close(cov, Jl @ Sigma @ Jl.transpose(1, 2), atol=1e-10, rtol=1e-9)
    lml = ll.log_marginal_likelihood()
    want = (-float(problem.loss_value(out, y, 1.0)) - 0.25 * sum(float(params[n].pow(2).sum()) for n in ll.names)
            + 9 * math.log(0.5) - 0.5 * torch.logdet(G[idx][:, idx] + 0.5 * torch.eye(18, dtype=D)))
    torch.testing.assert_close(torch.as_tensor(lml), torch.as_tensor(want), atol=1e-9, rtol=1e-9)


def test_tune_prior_and_predictive():
    problem, params, x, y = small()
    post = lp.laplace(problem, params, x, y, kind="kfac", prior_precision=1.0)
    tuned = lp.tune_prior(post, grid=torch.logspace(-2, 2, 9))
    assert tuned.log_marginal_likelihood() >= post.log_marginal_likelihood() - 1e-12
    probs = lp.predictive(tuned, x[:4], samples=8, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=D))
    # a huge prior precision collapses the predictive onto the MAP's softmax
    sharp = lp.predictive(lp.tune_prior(post, grid=[1e9]), x[:4], samples=2)
    torch.testing.assert_close(sharp, torch.softmax(problem.apply(params, x[:4]), -1), atol=1e-5, rtol=1e-4)
    d = lp.laplace(problem, params, x, y, kind="diag")
    assert lp.output_covariance(d, x[:3]).shape == (3, 3, 3)
    with pytest.raises(ValueError, match="kind"):
        lp.laplace(problem, params, x, y, kind="full")
    with pytest.raises(ValueError, match="prior_precision"):
        lp.laplace(problem, params, x, y, prior_precision=0.0)
    with pytest.raises(ValueError, match="subset"):
        lp.laplace(problem, params, x, y, kind="subset", subset=["nope"])
    with pytest.raises(ValueError, match="grid"):
        lp.tune_prior(post, grid=[-1.0])
    with pytest.raises(ValueError, match="kfac"):
        lp.output_covariance(post, x)
