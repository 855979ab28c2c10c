"""Implicit differentiation of a solution: the gradient of ``x*(θ)`` defined by
``F(x*, θ) = 0`` without differentiating through the solver.

The implicit function theorem (e.g. Blondel et al., *Efficient and Modular Implicit
Differentiation*, NeurIPS 2022, eq. 2; jaxopt's ``custom_root``) gives
``∂x*/∂θ = -A⁻¹ B`` with ``A = ∂F/∂x``, ``B = ∂F/∂θ`` at ``(x*, θ)``. Reverse mode needs
``θ̄ = -Bᵀ w`` where ``Aᵀ w = x̄``: one matrix-free linear solve whose matrix-vector products are
vector-Jacobian products of ``F`` (for ``F = ∇ₓ f``, Hessian-vector products), by conjugate
gradients (``A`` symmetric positive definite: a minimum's Hessian) or GMRES (any nonsingular ``A``).
Formulas: ``proofs/optim_modern.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..checks import check_choice, check_int, check_number

__all__ = ["root", "cg", "gmres", "SOLVES"]

SOLVES = ("cg", "gmres")


def cg(matvec: Callable[[Tensor], Tensor], b: Tensor, *, tol: float = 1e-10, maxiter: int | None = None,
       x0: Tensor | None = None) -> Tensor:
    """Conjugate gradients for ``A x = b``, ``A`` symmetric positive definite, from ``x0``
    (default 0; Hestenes & Stiefel 1952), until ``‖r‖ ≤ tol ‖b‖`` or ``maxiter`` (default
    ``len(b)``) steps. The one CG of the project (``research.cg`` wraps it for pytrees)."""
    x = torch.zeros_like(b) if x0 is None else x0
    r = b.clone() if x0 is None else b - matvec(x0)
    p = r.clone()
    rs = r @ r
    stop = (tol * torch.linalg.vector_norm(b)) ** 2
    for _ in range(maxiter or b.numel()):
        if rs <= stop:
            break
        ap = matvec(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def gmres(matvec: Callable[[Tensor], Tensor], b: Tensor, *, tol: float = 1e-10, maxiter: int | None = None) -> Tensor:
    """GMRES without restarts (Saad & Schultz 1986) for ``A x = b`` from ``x = 0``: Arnoldi with
    modified Gram-Schmidt, then the small least-squares problem ``min ‖β e₁ - H y‖`` solved
    directly; stops when the residual ``≤ tol ‖b‖`` or after ``maxiter`` (default ``len(b)``) steps."""
    beta = torch.linalg.vector_norm(b)
    if beta == 0:
        return torch.zeros_like(b)
    n = maxiter or b.numel()
    basis = [b / beta]
    h = torch.zeros(n + 1, n, dtype=b.dtype, device=b.device)
    e1 = torch.zeros(n + 1, dtype=b.dtype, device=b.device)
    e1[0] = beta
    y = None
    for k in range(n):
        w = matvec(basis[k])
        for j in range(k + 1):
            h[j, k] = basis[j] @ w
            w = w - h[j, k] * basis[j]
        h[k + 1, k] = torch.linalg.vector_norm(w)
        y = torch.linalg.lstsq(h[: k + 2, : k + 1], e1[: k + 2, None]).solution[:, 0]
        res = torch.linalg.vector_norm(e1[: k + 2] - h[: k + 2, : k + 1] @ y)
        if res <= tol * beta or h[k + 1, k] <= 1e-14 * beta:
            break
        basis.append(w / h[k + 1, k])
    return torch.stack(basis[: y.numel()], dim=1) @ y


def _flat(leaves) -> Tensor:
    return torch.cat([x.reshape(-1) for x in leaves])


def _unflat(vec: Tensor, like) -> list[Tensor]:
    out, i = [], 0
    for x in like:
        out.append(vec[i:i + x.numel()].reshape(x.shape))
        i += x.numel()
    return out


def root(solver: Callable, optimality_fn: Callable, *, solve: str = "cg", tol: float = 1e-10,
         maxiter: int | None = None) -> Callable:
    """``solution(init, *theta)``: ``solver(init, *theta)`` (any method, not differentiated; it
    runs without gradient tracking) whose gradient with respect to ``theta`` is the implicit one::

        ridge = lambda x, lam: 0.5 * ((X @ x - y) ** 2).sum() + 0.5 * lam * (x ** 2).sum()
        F = torch.func.grad(ridge)                       # optimality: ∇ₓ f(x*, λ) = 0
        solve = optim.implicit.root(my_solver, F)        # my_solver(init, lam) -> x*
        torch.func.grad(lambda lam: val_loss(solve(x0, lam)))(lam)

    ``optimality_fn(x, *theta)`` is ``F`` (same tree form as ``x``); ``x`` and each ``theta`` are
    tensors or trees of tensors. Backward: ``Aᵀ w = x̄`` by ``solve`` ("cg": needs ``A`` symmetric
    positive definite, as a minimum's Hessian; "gmres": any nonsingular ``A``) over
    vector-Jacobian products of ``F``, then ``θ̄ = -Bᵀ w``. Works under ``torch.func.grad`` and
    plain autograd (a ``torch.autograd.Function`` whose backward uses ``torch.func.vjp``).
    """
    if not callable(solver):
        raise TypeError(f"solver must be a function (init, *theta) -> solution, got {solver!r}")
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be a function (x, *theta) -> residual, got {optimality_fn!r}")
    check_choice("solve", solve, SOLVES)
    check_number("tol", tol, min=0)
    check_int("maxiter", maxiter, min=1, allow_none=True)
    linear = cg if solve == "cg" else gmres

    def solution(init: Any, *theta: Any) -> Any:
        theta_leaves, theta_spec = pytree.tree_flatten(theta)
        for i, t in enumerate(theta_leaves):
            if not isinstance(t, Tensor):
                raise TypeError(f"theta leaf {i} must be a Tensor, got {type(t).__name__}: {t!r}")
        with torch.no_grad():
            x_star = solver(init, *theta)
        x_leaves, x_spec = pytree.tree_flatten(x_star)
        x_leaves = [x.detach() for x in x_leaves]
        n_x = len(x_leaves)

        def residual(xs, ts):
            return pytree.tree_flatten(optimality_fn(pytree.tree_unflatten(list(xs), x_spec),
                                                     *pytree.tree_unflatten(list(ts), theta_spec)))[0]

        class _Implicit(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                return tuple(x.clone() for x in args[:n_x])

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(*inputs)

            @staticmethod
            def backward(ctx, *x_bar):
                saved = ctx.saved_tensors
                xs, ts = saved[:n_x], saved[n_x:]
                x_bar = [torch.zeros_like(x) if g is None else g for g, x in zip(x_bar, xs)]
                _, vjp_x = torch.func.vjp(lambda *a: tuple(residual(a, ts)), *xs)
                _, vjp_t = torch.func.vjp(lambda *a: tuple(residual(xs, a)), *ts)

                def at_matvec(v):  # Aᵀ v
                    return _flat(vjp_x(tuple(_unflat(v, xs))))

                w = linear(at_matvec, _flat(x_bar), tol=tol, maxiter=maxiter)
                t_bar = vjp_t(tuple(_unflat(-w, xs)))
                return (None,) * n_x + tuple(t_bar)

        out = _Implicit.apply(*x_leaves, *theta_leaves)
        return pytree.tree_unflatten(list(out), x_spec)

    return solution
