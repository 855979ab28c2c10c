"""Hyperparameter gradients by implicit differentiation, and by unrolling, for ridge regression.

The inner problem: ``x*(λ) = argmin_x ½‖A x - b‖² + ½ λ ‖x‖²`` (training data ``A, b``). The outer
objective: the validation loss ``½‖A_v x*(λ) - b_v‖²``. We want ``d val / d λ`` and use it to tune
``λ`` by gradient descent on ``log λ``.

- ``optim.implicit.root`` differentiates the solution through its optimality condition
  ``∇ₓ f(x*, λ) = 0`` (one conjugate-gradient solve with Hessian-vector products), whatever
  solver found ``x*``;
- ``optim.unroll`` differentiates through 300 steps of SGD with momentum on the inner problem;
- the closed form ``x* = (AᵀA + λI)⁻¹ Aᵀb`` differentiated by autograd is the check.

    python examples/implicit_ridge.py
"""

from __future__ import annotations

import torch

from aam_func import optim

F64 = torch.float64


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 40, 8
    truth = torch.randn(d, generator=g, dtype=F64)
    a, a_val = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    b = a @ truth + 1.5 * torch.randn(n, generator=g, dtype=F64)
    b_val = a_val @ truth + 1.5 * torch.randn(n, generator=g, dtype=F64)

    def inner(x, lam):
        return 0.5 * ((a @ x - b) ** 2).sum() + 0.5 * lam * (x ** 2).sum()

    def val(x):
        return 0.5 * ((a_val @ x - b_val) ** 2).sum()

    def solver(init, lam):  # any solver: it is not differentiated
        return optim.implicit.cg(lambda v: a.T @ (a @ v) + lam * v, a.T @ b, tol=1e-14)

    solution = optim.implicit.root(solver, torch.func.grad(inner), solve="cg")

    def closed_form(lam):
        return torch.linalg.solve(a.T @ a + lam * torch.eye(d, dtype=F64), a.T @ b)

    def unrolled(lam):
        lr = 1.0 / torch.linalg.eigvalsh(a.T @ a).max()
        x, _ = optim.unroll(lambda x: inner(x, lam), optim.sgd(lr, momentum=0.9), torch.zeros(d, dtype=F64), 300)
        return x

    lam = torch.tensor(1.0, dtype=F64)
    g_implicit = torch.func.grad(lambda l: val(solution(None, l)))(lam)
    g_closed = torch.func.grad(lambda l: val(closed_form(l)))(lam)
    g_unrolled = torch.func.grad(lambda l: val(unrolled(l)))(lam)
    print(f"d val / d lambda at lambda=1: implicit {g_implicit:.10f}, closed form {g_closed:.10f}, "
          f"unrolled (300 steps) {g_unrolled:.10f}")

    # tune log(lambda) by gradient descent on the validation loss
    log_lam = torch.tensor(0.0, dtype=F64)
    for step in range(30):
        grad, loss = torch.func.grad_and_value(lambda t: val(solution(None, t.exp())))(log_lam)
        log_lam = log_lam - 0.2 * grad
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}: lambda {log_lam.exp():.4f}, validation loss {loss:.4f}")


if __name__ == "__main__":
    main()
