"""Laplace approximations around trained params (MacKay 1992; Daxberger et al. 2021):
p(θ | D) ≈ N(θ*, Λ⁻¹) with Λ = GGN of the summed negative log-likelihood + δI (prior N(0, δ⁻¹I)).

    post = laplace(problem, params, x, y, kind="kfac", prior_precision=1.0)
    post = tune_prior(post, grid=torch.logspace(-3, 3, 25))     # max marginal likelihood
    probs = predictive(post, x_test, samples=64, generator=g)   # linearised (GLM) predictive

``kind``: ``"diag"`` (the exact diagonal GGN, ``diag.diag_ggn``), ``"kfac"`` (KFAC factors with
an augmented bias, ``kfac.collect``: only the factored weights and their biases are stochastic,
the rest stay at θ*), ``"last_layer"`` / ``"subset"`` (the named leaves, ``subset=``, with the
full dense GGN block J_Sᵀ H J_S from one ``jacrev``: the last layer's names by default, the
leaves of the final linear-like use found through ``aam_func.intercept``).

The marginal likelihood (Immer et al. 2021, eq. 5), over the stochastic parameters S (P_S of them):

    log p(D | δ) ≈ log p(D | θ*) - δ/2 ‖θ*_S‖² + P_S/2 log δ - ½ log det Λ(δ)

with log p(D | θ*) including the likelihood's normaliser (mse: the Gaussian of variance ½). For a
linear-Gaussian model it is exact (``tests/test_research_laplace.py``). Derivations:
``proofs/curvature.md`` §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor
from torch.func import jacrev, jvp

from .. import tree
from ..checks import check_choice, check_int, check_number
from ..intercept import Client, Intercept
from . import kfac as _kfac
from .diag import diag_ggn
from .problem import Problem

__all__ = ["Posterior", "laplace", "tune_prior", "predictive", "output_covariance", "last_layer_names", "KINDS"]

KINDS = ("diag", "kfac", "last_layer", "subset")


@dataclass(frozen=True)
class Posterior:
    """``mean`` (θ*, flat {name: tensor}), the stochastic ``names``, the likelihood curvature
    (``curv``: diag {name: tensor}, KFAC {name: (QA, QG, λ_A λ_G), bias name}, or the dense
    block (P_S, P_S)), ``prior_precision`` δ and ``loglik`` log p(D | θ*)."""

    problem: Problem
    kind: str
    params: object  # θ* in the caller's tree form (rebuilds the outputs' params)
    mean: dict
    names: tuple
    curv: object
    prior_precision: float
    loglik: float

    def precision_eigs(self) -> Tensor:
        """All eigenvalues of Λ = curvature + δI over the stochastic parameters, flat."""
        d = self.prior_precision
        if self.kind == "diag":
            return torch.cat([self.curv[n].reshape(-1) for n in self.names]) + d
        if self.kind == "kfac":
            return torch.cat([lam.reshape(-1) for (_, _, lam, _) in self.curv.values()]) + d
        return torch.linalg.eigvalsh(self.curv) + d

    def log_marginal_likelihood(self, prior_precision: Optional[float] = None) -> Tensor:
        """log p(D | δ) by the formula of the module doc (δ: this posterior's unless given)."""
        d = self.prior_precision if prior_precision is None else check_number("prior_precision", prior_precision,
                                                                                min=0, min_open=True)
        post = replace(self, prior_precision=d)
        theta_sq = sum(float(self.mean[n].pow(2).sum()) for n in self.names)
        eigs = post.precision_eigs()
        P = eigs.numel()
        return self.loglik - 0.5 * d * theta_sq + 0.5 * P * math.log(d) - 0.5 * eigs.log().sum()

    def sample(self, generator: Optional[torch.Generator] = None) -> dict:
        """One draw θ - θ* ~ N(0, Λ⁻¹) on the stochastic names (a flat {name: tensor})."""
        d = self.prior_precision
        if self.kind == "diag":
            return {n: _randn(self.curv[n], generator) / (self.curv[n] + d).sqrt() for n in self.names}
        if self.kind == "kfac":
            out = {}
            for name, (QA, QG, lam, bias) in self.curv.items():
                M = QG @ (_randn(lam, generator) / (lam + d).sqrt()) @ QA.t()
                if bias is not None:
                    M, out[bias] = M[:, :-1], M[:, -1]
                out[name] = M.reshape(self.mean[name].shape)
            return {n: out[n] for n in self.names}  # the mean's key order (jvp matches trees)
        vals, vecs = torch.linalg.eigh(self.curv + d * torch.eye(self.curv.shape[0], dtype=self.curv.dtype))
        z = vecs @ (_randn(vals, generator) / vals.sqrt())
        return _unflat_subset(self, z)


def _randn(like: Tensor, generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def _unflat_subset(post: Posterior, z: Tensor) -> dict:
    out, i = {}, 0
    for n in post.names:
        k = post.mean[n].numel()
        out[n] = z[i:i + k].reshape(post.mean[n].shape)
        i += k
    return out


def _loglik(problem: Problem, params, x, y) -> float:
    """log p(D | θ): minus the summed loss, plus the mse Gaussian's normaliser (variance ½)."""
    out = problem.apply(params, x)
    nll = float(problem.loss_value(out, y, 1.0))
    if problem.loss == "mse":
        nll += 0.5 * y.numel() * math.log(math.pi)
    return -nll


class _LastLinear(Client):
    def __init__(self):
        self.last = None

    def linear(self, use):
        self.last = (use.key, use.bias)
        return use.run()

    conv = linear


def last_layer_names(problem: Problem, params, x) -> tuple:
    """The weight (and bias) names of the last linear-like use the model makes on ``x``."""
    flat = tree.flatten(params)
    rec = _LastLinear()
    with torch.no_grad(), Intercept({n: t for n, t in flat.items() if t.dim() >= 2}, rec):
        problem.apply(params, x)
    if rec.last is None:
        raise ValueError("kind='last_layer': the model makes no F.linear / addmm / conv use of a params leaf")
    key, bias = rec.last
    bname = next((n for n, t in flat.items() if t is bias), None)
    return (key,) + ((bname,) if bname else ())


def _dense_block(problem: Problem, params, x, y, names) -> Tensor:
    """J_Sᵀ (H_f / c) J_S over the subset (the summed loss's GGN block)."""
    flat = tree.flatten(params)
    sub = {n: flat[n] for n in names}
    f = lambda s: problem.apply(tree.unflatten_like(params, {**flat, **s}), x)  # noqa: E731
    out = f(sub).detach()
    J = jacrev(f)(sub)
    J = torch.cat([J[n].reshape(out.numel(), -1) for n in names], 1)  # (outputs, P_S)
    cols = problem.output_sqrt(out, y, 1.0).reshape(out.shape[-1], -1)  # (C, outputs)
    C = out.shape[-1]
    rows = out.numel() // C
    JS = (cols.reshape(C, rows, C, 1) * J.reshape(1, rows, C, -1)).sum(2)  # (C, rows, P_S): S_kᵀ J per row
    JS = JS.reshape(-1, J.shape[1])
    return JS.t() @ JS


def laplace(problem: Problem, params, inputs, targets, *, kind: str = "diag", prior_precision: float = 1.0,
            subset=None, chunk_size: Optional[int] = None) -> Posterior:
    """The Laplace posterior at ``params`` (θ*, a MAP or trained point); see the module doc."""
    check_choice("kind", kind, KINDS)
    check_number("prior_precision", prior_precision, min=0, min_open=True)
    flat = tree.flatten(params)
    c = problem.scale(targets)
    loglik = _loglik(problem, params, inputs, targets)
    if kind == "diag":
        d = diag_ggn(problem, params, inputs, targets, chunk_size=chunk_size)
        curv = {n: v / c for n, v in tree.flatten(d).items()}
        names = tuple(flat)
    elif kind == "kfac":
        facs = _kfac.collect(problem, params, inputs, targets, bias="augment", chunk_size=chunk_size)
        curv, names = {}, []
        for n, f in facs.factors.items():
            (la, QA), (lg, QG) = torch.linalg.eigh(f.A), torch.linalg.eigh(f.G)
            # the summed loss's KFAC: (A ⊗ G) / c; the factors' rows count N examples
            curv[n] = (QA, QG, (lg[:, None] * la[None, :]).clamp(min=0) / c, f.bias if f.augmented else None)
            names += [n] + ([f.bias] if f.augmented else [])
        names = tuple(names)
    else:
        names = tuple(subset) if kind == "subset" else last_layer_names(problem, params, inputs)
        missing = [n for n in names if n not in flat]
        if kind == "subset" and (not names or missing):
            raise ValueError(f"subset: names {missing or list(names)} are not params leaves ({list(flat)[:8]} ...)")
        curv = _dense_block(problem, params, inputs, targets, names)
    return Posterior(problem, kind, params, flat, names, curv, float(prior_precision), loglik)


def tune_prior(post: Posterior, grid=None) -> Posterior:
    """The posterior with the δ of ``grid`` (default 10^-4 … 10^4, 41 points) that maximises the
    marginal likelihood."""
    grid = torch.logspace(-4, 4, 41) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
    if grid.numel() == 0 or bool((grid <= 0).any()):
        raise ValueError(f"grid must hold positive prior precisions, got {grid.tolist()}")
    values = torch.stack([torch.as_tensor(post.log_marginal_likelihood(float(d))) for d in grid])
    return replace(post, prior_precision=float(grid[int(values.argmax())]))


def output_covariance(post: Posterior, inputs) -> Tensor:
    """(B, ..., C, C) covariance of the linearised outputs J Λ⁻¹ Jᵀ per row (``"diag"``,
    ``"last_layer"``, ``"subset"``: exact, from one jacrev over the stochastic names)."""
    if post.kind == "kfac":
        raise ValueError("kind='kfac': use predictive(..., samples=...) (the output covariance is sampled)")
    names = post.names
    sub = {n: post.mean[n] for n in names}
    f = lambda s: post.problem.apply(tree.unflatten_like(post.params, {**post.mean, **s}), inputs)  # noqa: E731
    out = f(sub)
    J = jacrev(f)(sub)
    J = torch.cat([J[n].reshape(out.numel(), -1) for n in names], 1)
    C = out.shape[-1]
    J = J.reshape(-1, C, J.shape[1])  # (rows, C, P_S)
    if post.kind == "diag":
        var = torch.cat([(1.0 / (post.curv[n] + post.prior_precision)).reshape(-1) for n in names])
        cov = (J * var) @ J.transpose(1, 2)
    else:
        Sigma = torch.linalg.inv(post.curv + post.prior_precision * torch.eye(post.curv.shape[0], dtype=post.curv.dtype))
        cov = J @ Sigma @ J.transpose(1, 2)
    return cov.reshape(tuple(out.shape) + (C,))


def predictive(post: Posterior, inputs, *, samples: int = 32, generator: Optional[torch.Generator] = None) -> Tensor:
    """The linearised (GLM) predictive: mean over draws θ ~ N(θ*, Λ⁻¹) of softmax(f(θ*) + J (θ - θ*))
    (cross-entropy) or of the linearised outputs (mse); J (θ - θ*) by one jvp per draw."""
    check_int("samples", samples, min=1)
    mean = {n: post.mean[n] for n in post.names}
    f = lambda s: post.problem.apply(tree.unflatten_like(post.params, {**post.mean, **s}), inputs)  # noqa: E731
    total = 0
    for _ in range(samples):
        out, delta = jvp(f, (mean,), (post.sample(generator),))
        lin = out + delta
        total = total + (torch.softmax(lin, -1) if post.problem.loss == "cross_entropy" else lin)
    return total / samples
