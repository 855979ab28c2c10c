"""Differentiable optimisation: every transformation differentiates through 10 unrolled updates
(meta-gradients equal float64 finite differences), data-weight hypergradients, and
``implicit.root`` against the ridge closed form and against unrolled gradients after
convergence. Formulas and claims: proofs/optim_modern.md."""

from __future__ import annotations

import pytest
import torch

from aam_func import optim, tree

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
G = torch.Generator().manual_seed(0)
XS = torch.randn(12, 4, generator=G, dtype=F64)
YS = torch.randn(12, 3, generator=G, dtype=F64)
XV = torch.randn(8, 4, generator=G, dtype=F64)
YV = torch.randn(8, 3, generator=G, dtype=F64)
P0 = {"w": torch.randn(4, 3, generator=G, dtype=F64) * 0.5, "b": torch.randn(3, generator=G, dtype=F64) * 0.1}


def train_loss(p, batch=None):
    x, y, wt = batch if batch is not None else (XS, YS, torch.ones(len(XS), dtype=F64))
    pred = torch.tanh(x @ p["w"] + p["b"])
    return (wt * ((pred - y) ** 2).mean(-1)).mean()


def val_loss(p):
    return ((torch.tanh(XV @ p["w"] + p["b"]) - YV) ** 2).mean()


def _fd(f, x: torch.Tensor, h=1e-6) -> torch.Tensor:
    """Central differences of scalar ``f`` at ``x`` (any shape), elementwise."""
    out = torch.zeros_like(x)
    flat = out.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view(x.shape)
        flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    return out


OPTIMIZERS = {
    "sgd_momentum": lambda lr: optim.sgd(lr, momentum=0.9, nesterov=True),
    "adam_eps_root": lambda lr: optim.adam(lr, eps_root=1e-12),
    "adamw": lambda lr: optim.adamw(lr, weight_decay=0.1, eps_root=1e-12),
    "lion": lambda lr: optim.lion(lr, weight_decay=0.1),
    "muon": lambda lr: optim.muon(lr, ns_dtype=None, mask=["w"], adam_learning_rate=lr),
    "adafactor": lambda lr: optim.adafactor(lr, weight_decay=0.1),
    "schedule_free": lambda lr: optim.schedule_free_adamw(lr, weight_decay=0.1, warmup_steps=3),
    "ema": lambda lr: optim.ema(optim.sgd(lr, momentum=0.9), 0.8),
    "lookahead": lambda lr: optim.lookahead(optim.adam(lr, eps_root=1e-12), 3, 0.5),
    "sam": lambda lr: optim.sam(optim.sgd(lr), rho=0.05),
    "lamb": lambda lr: optim.lamb(lr, weight_decay=0.01),
    "lars": lambda lr: optim.lars(lr, weight_decay=1e-3, trust_coefficient=0.1),
    "sophia": lambda lr: optim.sophia(lr, gamma=0.5, update_every=3),
    "clip_inject_adamw": lambda lr: optim.chain(optim.clip_by_global_norm(0.05), optim.inject_hyperparams(optim.adamw)(
        learning_rate=lr, eps_root=1e-12)),
    "multi_steps": lambda lr: optim.multi_steps(optim.adam(lr, eps_root=1e-12), 2),
    "apply_if_finite": lambda lr: optim.apply_if_finite(optim.sgd(lr, momentum=0.9)),
    "partition": lambda lr: optim.partition({"a": optim.adamw(lr, eps_root=1e-12), "s": optim.sgd(lr)},
                                            lambda n, x: "a" if x.dim() == 2 else "s"),
    "wsd_adamw": lambda lr: optim.chain(optim.scale_by_adam(eps_root=1e-12),
                                        optim.scale(-lr), optim.scale_by_schedule(optim.warmup_stable_decay(1.0, 2, 10, 4))),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_learning_rate_hypergradient_through_10_steps_equals_finite_differences(name):
    make = OPTIMIZERS[name]

    def meta(lr):
        params, state = optim.unroll(train_loss, make(lr), P0, 10)
        return val_loss(optim.eval_params(state, params))

    lr = torch.tensor(0.03, dtype=F64)
    g = torch.func.grad(meta)(lr)
    fd = _fd(meta, lr)
    assert torch.isfinite(g) and g.abs() > 0
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-9)


def test_initial_params_gradient_through_10_adamw_steps_equals_finite_differences():
    """MAML-style: the gradient of the validation loss after training, in the initial bias."""
    def meta(b0):
        params, _ = optim.unroll(train_loss, optim.adamw(0.02, eps_root=1e-12), {"w": P0["w"], "b": b0}, 10)
        return val_loss(params)

    torch.testing.assert_close(torch.func.grad(meta)(P0["b"]), _fd(meta, P0["b"]), rtol=1e-5, atol=1e-9)


def test_data_weight_hypergradient_equals_finite_differences():
    batches = [(XS[:6], YS[:6]), (XS[6:], YS[6:])]

    def meta(weights):
        seq = [(x, y, weights[i * 6:(i + 1) * 6]) for i, (x, y) in enumerate(batches)]
        params, _ = optim.unroll(train_loss, optim.sgd(0.2, momentum=0.5), P0, 10, batches=seq)
        return val_loss(params)

    w = torch.ones(12, dtype=F64)
    torch.testing.assert_close(torch.func.grad(meta)(w), _fd(meta, w), rtol=1e-5, atol=1e-9)


def test_unroll_equals_a_hand_written_loop_and_takes_a_state():
    opt = optim.adam(0.01)
    p, s = optim.unroll(train_loss, opt, P0, 4)
    p2, s2 = optim.unroll(train_loss, opt, P0, 2)
    p2, s2 = optim.unroll(train_loss, opt, p2, 2, state=s2)
    q, st = P0, opt.init(P0)
    for _ in range(4):
        u, st = opt.update(torch.func.grad(train_loss)(q), st, q)
        q = optim.apply_updates(q, u)
    for k in ("w", "b"):
        torch.testing.assert_close(p[k], q[k], rtol=0, atol=0)
        torch.testing.assert_close(p2[k], q[k], rtol=0, atol=0)


def test_unroll_bad_input():
    with pytest.raises(ValueError, match="steps"):
        optim.unroll(train_loss, optim.sgd(0.1), P0, -1)
    with pytest.raises(TypeError, match="batches"):
        optim.unroll(train_loss, optim.sgd(0.1), P0, 1, batches=42)
    with pytest.raises(TypeError, match="opt"):
        optim.unroll(train_loss, "sgd", P0, 1)


# ----------------------------------------------------------------------------- implicit differentiation

XR = torch.randn(30, 6, generator=G, dtype=F64)
YR = torch.randn(30, generator=G, dtype=F64)
XRV = torch.randn(15, 6, generator=G, dtype=F64)
YRV = torch.randn(15, generator=G, dtype=F64)


def ridge(x, lam):
    return 0.5 * ((XR @ x - YR) ** 2).sum() + 0.5 * lam * (x ** 2).sum()


def ridge_solver(init, lam):  # by CG on the normal equations: any solver will do, it is not differentiated
    return optim.implicit.cg(lambda v: XR.T @ (XR @ v) + lam * v, XR.T @ YR, tol=1e-14)


def ridge_closed_form(lam):
    return torch.linalg.solve(XR.T @ XR + lam * torch.eye(6, dtype=F64), XR.T @ YR)


def ridge_val(x):
    return 0.5 * ((XRV @ x - YRV) ** 2).sum()


@pytest.mark.parametrize("solve", ["cg", "gmres"])
def test_implicit_ridge_hypergradient_equals_the_closed_form(solve):
    sol = optim.implicit.root(ridge_solver, torch.func.grad(ridge), solve=solve)
    lam = torch.tensor(0.8, dtype=F64)
    g = torch.func.grad(lambda l: ridge_val(sol(None, l)))(lam)
    ref = torch.func.grad(lambda l: ridge_val(ridge_closed_form(l)))(lam)
    assert abs(g - ref) <= 1e-6 * abs(ref)
    # plain autograd too
    lam_r = lam.clone().requires_grad_()
    (g2,) = torch.autograd.grad(ridge_val(sol(None, lam_r)), lam_r)
    assert abs(g2 - ref) <= 1e-6 * abs(ref)


def test_implicit_gradient_equals_unrolled_gradient_after_convergence():
    lam0 = torch.tensor(0.8, dtype=F64)
    lr = 1.0 / torch.linalg.eigvalsh(XR.T @ XR + lam0 * torch.eye(6, dtype=F64)).max()

    def unrolled(lam):
        x, _ = optim.unroll(lambda x: ridge(x, lam), optim.sgd(lr, momentum=0.9), torch.zeros(6, dtype=F64), 400)
        return ridge_val(x)

    sol = optim.implicit.root(ridge_solver, torch.func.grad(ridge))
    g_implicit = torch.func.grad(lambda l: ridge_val(sol(None, l)))(lam0)
    g_unrolled = torch.func.grad(unrolled)(lam0)
    assert abs(g_unrolled - g_implicit) <= 1e-6 * abs(g_implicit)


def test_implicit_logistic_regression_over_a_tree_and_two_hyperparameters():
    """A tree solution (weight, bias), two hyperparameters; GMRES; against finite differences of
    the solve run to convergence."""
    x = torch.randn(40, 3, generator=G, dtype=F64)
    y = (torch.rand(40, generator=G, dtype=F64) > 0.5).to(F64)

    def objective(p, lam, mu):
        z = x @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") \
            + 0.5 * lam * (p["w"] ** 2).sum() + 0.5 * mu * p["b"] ** 2

    def solver(init, lam, mu):
        p = init
        for _ in range(12):  # Newton on the flat vector (quadratic convergence: 12 steps reach float64)
            flat = torch.cat([p["w"], p["b"].reshape(1)])
            f = lambda v: objective({"w": v[:3], "b": v[3]}, lam, mu)  # noqa: E731
            g = torch.func.grad(f)(flat)
            h = torch.func.hessian(f)(flat)
            flat = flat - torch.linalg.solve(h, g)
            p = {"w": flat[:3], "b": flat[3]}
        return p

    sol = optim.implicit.root(solver, torch.func.grad(objective), solve="gmres")
    init = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def meta(lam, mu):
        p = sol(init, lam, mu)
        return (p["w"] ** 2).sum() + p["b"]

    lam, mu = torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64)
    g_lam, g_mu = torch.func.grad(meta, argnums=(0, 1))(lam, mu)
    torch.testing.assert_close(g_lam, _fd(lambda l: meta(l, mu), lam), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(g_mu, _fd(lambda m: meta(lam, m), mu), rtol=1e-6, atol=1e-10)


def test_cg_and_gmres_solve_linear_systems():
    a = torch.randn(7, 7, generator=G, dtype=F64)
    spd = a @ a.T + 7 * torch.eye(7, dtype=F64)
    b = torch.randn(7, generator=G, dtype=F64)
    torch.testing.assert_close(optim.implicit.cg(lambda v: spd @ v, b), torch.linalg.solve(spd, b))
    ns = a + 5 * torch.eye(7, dtype=F64)
    torch.testing.assert_close(optim.implicit.gmres(lambda v: ns @ v, b), torch.linalg.solve(ns, b))
    assert torch.equal(optim.implicit.gmres(lambda v: ns @ v, torch.zeros(7, dtype=F64)), torch.zeros(7, dtype=F64))


def test_implicit_root_bad_input():
    with pytest.raises(ValueError, match="solve"):
        optim.implicit.root(ridge_solver, torch.func.grad(ridge), solve="lu")
    with pytest.raises(TypeError, match="optimality_fn"):
        optim.implicit.root(ridge_solver, None)
    with pytest.raises(TypeError, match="solver"):
        optim.implicit.root("cg", torch.func.grad(ridge))
    sol = optim.implicit.root(ridge_solver, torch.func.grad(ridge))
    with pytest.raises(TypeError, match="theta leaf 0"):
        sol(None, 0.5)


def test_ema_state_and_eval_params_keep_the_tree_form():
    params = [torch.ones(2), torch.zeros(3)]
    opt = optim.ema(optim.sgd(0.5), 0.5)
    state = opt.init(params)
    u, state = opt.update([torch.ones(2), torch.ones(3)], state, params)
    out = optim.eval_params(state, optim.apply_updates(params, u))
    assert isinstance(out, list) and torch.equal(out[0], torch.full((2,), 0.5))
    assert optim.has_average(state) and not optim.has_average(optim.sgd(0.1).init(params))
    assert optim.eval_params(optim.sgd(0.1).init(params), params) is params
    assert tree.count(state["ema"]) == 5


def test_implicit_ridge_example_runs_and_agrees(capsys):
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "implicit_ridge.py"
    runpy.run_path(str(path), run_name="__main__")
    first = capsys.readouterr().out.splitlines()[0]
    implicit, closed = (float(first.split(name)[1].split(",")[0]) for name in ("implicit ", "closed form "))
    assert abs(implicit - closed) <= 1e-6 * abs(closed)
