"""Estimators over any symmetric matrix-vector product ``mv(v) -> A v`` on Params: Hutchinson's
trace and diagonal, Lanczos's top eigenpairs, and conjugate gradients for (A + λI)⁻¹ b.

    mv = lambda v: ggn_vp(problem, params, x, y, v)
    tr = hutchinson_trace(mv, params, samples=100, generator=g)
    vals, vecs = lanczos(mv, params, k=5, iterations=30, generator=g)

Hutchinson (1990): E[vᵀ A v] = tr A and E[v ⊙ A v] = diag A for Rademacher v (entries ±1).
Lanczos with full reorthogonalisation: the Krylov basis Q (m vectors) makes T = Qᵀ A Q
tridiagonal; its extreme eigenvalues converge first to A's (Golub & Van Loan §10.1). When the
Krylov space is A's whole range (m ≥ rank), they are exact. Derivations: proofs/curvature.md §3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..checks import check_int, check_number

__all__ = ["Flat", "hutchinson_trace", "hutchinson_diag", "lanczos", "cg"]


class Flat:
    """Params <-> one flat vector (the leaves' order and shapes of ``like``)."""

    def __init__(self, like):
        leaves, self.spec = pytree.tree_flatten(like)
        for i, x in enumerate(leaves):
            if not isinstance(x, Tensor):
                raise TypeError(f"params leaf #{i} must be a Tensor, got {type(x).__name__}")
        self.shapes = [x.shape for x in leaves]
        self.sizes = [x.numel() for x in leaves]
        self.dtype, self.device = leaves[0].dtype, leaves[0].device
        self.size = sum(self.sizes)

    def vec(self, t) -> Tensor:
        return torch.cat([x.reshape(-1) for x in pytree.tree_leaves(t)])

    def tree(self, v: Tensor):
        parts = torch.split(v, self.sizes)
        return pytree.tree_unflatten([p.reshape(s) for p, s in zip(parts, self.shapes)], self.spec)

    def operator(self, mv: Callable) -> Callable[[Tensor], Tensor]:
        return lambda v: self.vec(mv(self.tree(v)))

    def rademacher(self, generator: Optional[torch.Generator]) -> Tensor:
        bits = torch.randint(0, 2, (self.size,), generator=generator, device=self.device)
        return (2 * bits - 1).to(self.dtype)


def hutchinson_trace(mv: Callable, like, *, samples: int = 10, generator: Optional[torch.Generator] = None) -> Tensor:
    """Estimate tr A from ``samples`` Rademacher probes (unbiased; variance 2 Σ_{i≠j} A_ij² / samples)."""
    check_int("samples", samples, min=1)
    flat = Flat(like)
    op = flat.operator(mv)
    total = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for _ in range(samples):
        v = flat.rademacher(generator)
        total = total + v @ op(v)
    return total / samples


def hutchinson_diag(mv: Callable, like, *, samples: int = 10, generator: Optional[torch.Generator] = None):
    """Estimate diag A (Params shaped like ``like``) from ``samples`` Rademacher probes."""
    check_int("samples", samples, min=1)
    flat = Flat(like)
    op = flat.operator(mv)
    total = torch.zeros(flat.size, dtype=flat.dtype, device=flat.device)
    for _ in range(samples):
        v = flat.rademacher(generator)
        total = total + v * op(v)
    return flat.tree(total / samples)


def lanczos(mv: Callable, like, *, k: int = 1, iterations: Optional[int] = None,
            generator: Optional[torch.Generator] = None, tol: float = 1e-12):
    """Top-``k`` (largest algebraic) eigenvalues (k,) descending and eigenvectors (Params with a
    leading k dim) of the symmetric A, from ``iterations`` Lanczos steps (default min(P, 2k + 20))
    with full reorthogonalisation; stops early when the Krylov space is exhausted (β < tol·‖α‖)."""
    flat = Flat(like)
    check_int("k", k, min=1, max=flat.size)
    m = check_int("iterations", iterations if iterations is not None else min(flat.size, 2 * k + 20),
                  min=k, max=flat.size)
    op = flat.operator(mv)
    q = torch.randn(flat.size, generator=generator, dtype=flat.dtype, device=flat.device)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for j in range(m):
        w = op(Q[j])
        alphas.append(Q[j] @ w)
        basis = torch.stack(Q)
        w = w - basis.t() @ (basis @ w)  # full reorthogonalisation, twice for stability
        w = w - basis.t() @ (basis @ w)
        beta = w.norm()
        if j == m - 1 or beta <= tol * max(1.0, float(torch.stack(alphas).abs().max())):
            break
        betas.append(beta)
        Q.append(w / beta)
    n = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas[: n - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(T)
    top = min(k, n)
    order = torch.argsort(vals, descending=True)[:top]
    ritz = (torch.stack(Q[:n]).t() @ vecs[:, order]).t()  # (top, P)
    return vals[order], pytree.tree_map(lambda *xs: torch.stack(xs), *[flat.tree(r) for r in ritz])


def cg(mv: Callable, b, *, damping: float = 0.0, iterations: int = 100, tol: float = 1e-10, x0=None):
    """(A + damping·I)⁻¹ b by conjugate gradients (A symmetric positive semi-definite; damping > 0
    makes it definite), for pytrees: :func:`aam_func.optim.implicit.cg` on the flat vector. Stops
    when ‖r‖ ≤ tol·‖b‖ or after ``iterations`` steps."""
    from ..optim.implicit import cg as flat_cg

    check_number("damping", damping, min=0)
    check_int("iterations", iterations, min=1)
    flat = Flat(b)
    op = flat.operator(mv)
    x = flat_cg(lambda v: op(v) + damping * v, flat.vec(b), tol=tol, maxiter=iterations,
                x0=None if x0 is None else flat.vec(x0))
    return flat.tree(x)
