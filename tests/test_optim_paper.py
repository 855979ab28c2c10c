"""The optimizers without an installable PyTorch reference against their papers' equations,
written out here in float64 (Lookahead, SAM/ASAM, LAMB, LARS, Sophia-H, WSD), plus the bad-input
errors of every new optimizer. Formulas and claims: proofs/optim_modern.md."""

from __future__ import annotations

import pytest
import torch

from aam_func import optim, tree
from aam_func.optim.sophia import hutchinson

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _problem(seed=0):
    """A float64 quadratic-plus-quartic loss on a tree of two leaves, and its params."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 3, generator=g, dtype=F64) + 0.5
    b = torch.rand(3, generator=g, dtype=F64) + 0.5
    params = {"w": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}

    def loss(p):
        return 0.5 * (a * p["w"] ** 2).sum() + 0.5 * (b * p["b"] ** 2).sum() + 0.1 * (p["w"] ** 4).sum()

    return loss, params


def _run(opt, loss, params, steps, **kw):
    state = opt.init(params)
    for _ in range(steps):
        g = torch.func.grad(loss)(params)
        u, state = opt.update(g, state, params, **({"loss_fn": loss} if kw.get("with_loss") else {}))
        params = optim.apply_updates(params, u)
    return params, state


def _close(a, b, tol=1e-12):
    for k, v in tree.flatten(b).items():
        torch.testing.assert_close(tree.flatten(a)[k], v, rtol=tol, atol=tol)


def test_lookahead_matches_algorithm_1():
    loss, p0 = _problem()
    k, alpha, lr = 3, 0.5, 0.05
    ours, state = _run(optim.lookahead(optim.sgd(lr), k, alpha), loss, p0, 10)
    slow = {n: v.clone() for n, v in p0.items()}
    fast = {n: v.clone() for n, v in p0.items()}
    for t in range(1, 11):
        g = torch.func.grad(loss)(fast)
        fast = {n: fast[n] - lr * g[n] for n in fast}
        if t % k == 0:
            slow = {n: slow[n] + alpha * (fast[n] - slow[n]) for n in slow}
            fast = {n: v.clone() for n, v in slow.items()}
    _close(ours, fast)
    _close(optim.eval_params(state, ours), slow)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_foret_algorithm_1(adaptive):
    loss, p0 = _problem(1)
    rho, lr = 0.05, 0.1
    ours, _ = _run(optim.sam(optim.sgd(lr), rho, adaptive=adaptive), loss, p0, 10, with_loss=True)
    p = dict(p0)
    for _ in range(10):
        g = torch.func.grad(loss)(p)
        s = {n: (p[n].abs() if adaptive else torch.ones_like(p[n])) for n in p}
        norm = torch.sqrt(sum(((s[n] * g[n]) ** 2).sum() for n in p))
        e = {n: rho * s[n] ** 2 * g[n] / (norm + 1e-12) for n in p}
        g_sam = torch.func.grad(loss)({n: p[n] + e[n] for n in p})
        p = {n: p[n] - lr * g_sam[n] for n in p}
    _close(ours, p)


def test_lamb_matches_algorithm_2():
    loss, p0 = _problem(2)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.01
    ours, _ = _run(optim.lamb(lr, b1, b2, eps, weight_decay=wd), loss, p0, 10)
    p, m, v = dict(p0), {n: torch.zeros_like(x) for n, x in p0.items()}, {n: torch.zeros_like(x) for n, x in p0.items()}
    for t in range(1, 11):
        g = torch.func.grad(loss)(p)
        for n in p:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            r = (m[n] / (1 - b1 ** t)) / (torch.sqrt(v[n] / (1 - b2 ** t)) + eps) + wd * p[n]
            p[n] = p[n] - lr * (p[n].norm() / r.norm()) * r
    _close(ours, p)


def test_lars_matches_you_et_al_eq_6_7():
    loss, p0 = _problem(3)
    lr, wd, eta, mom = 0.5, 1e-3, 0.01, 0.9
    ours, _ = _run(optim.lars(lr, wd, trust_coefficient=eta, momentum=mom), loss, p0, 10)
    p, buf = dict(p0), {n: torch.zeros_like(x) for n, x in p0.items()}
    for _ in range(10):
        g = torch.func.grad(loss)(p)
        for n in p:
            d = g[n] + wd * p[n]
            d = eta * p[n].norm() / d.norm() * d
            buf[n] = mom * buf[n] + d
            p[n] = p[n] - lr * buf[n]
    _close(ours, p)


def test_trust_ratio_is_one_where_a_norm_is_zero():
    g = {"a": torch.zeros(3), "b": torch.ones(3)}
    p = {"a": torch.ones(3), "b": torch.zeros(3)}
    u, _ = optim.scale_by_trust_ratio().update(g, {}, p)
    assert torch.equal(u["a"], g["a"]) and torch.equal(u["b"], g["b"])


@pytest.mark.parametrize("k", [1, 3])
def test_sophia_matches_algorithm_3_with_hutchinson(k):
    loss, p0 = _problem(4)
    lr, b1, b2, gamma, eps, wd, seed = 0.05, 0.965, 0.99, 0.5, 1e-12, 0.1, 7
    ours, _ = _run(optim.sophia(lr, b1, b2, gamma, eps, wd, update_every=k, seed=seed), loss, p0, 10, with_loss=True)
    p = dict(p0)
    m = {n: torch.zeros_like(x) for n, x in p.items()}
    h = {n: torch.zeros_like(x) for n, x in p.items()}
    for t in range(1, 11):
        g = torch.func.grad(loss)(p)
        m = {n: b1 * m[n] + (1 - b1) * g[n] for n in p}
        if t % k == 1 % k:
            gen = torch.Generator().manual_seed(seed + t)
            u = {n: torch.randn(p[n].shape, generator=gen, dtype=F64) for n in ("w", "b")}  # flatten order: w, b
            _, hv = torch.func.jvp(torch.func.grad(loss), (p,), (u,))
            h = {n: b2 * h[n] + (1 - b2) * u[n] * hv[n] for n in p}
        p = {n: p[n] - lr * wd * p[n] - lr * torch.clamp(m[n] / torch.clamp(gamma * h[n], min=eps), -1, 1) for n in p}
    _close(ours, p)


def test_hutchinson_is_unbiased_for_a_diagonal_hessian():
    a = torch.linspace(0.5, 2.0, 6, dtype=F64)
    loss = lambda p: 0.5 * (a * p["x"] ** 2).sum()  # noqa: E731
    p = {"x": torch.randn(6, dtype=F64)}
    est = torch.stack([hutchinson(loss, p, 0, t)["x"] for t in range(400)]).mean(0)
    torch.testing.assert_close(est, a, rtol=0.2, atol=0)  # 400 draws: std of the mean ≈ 0.07 a


def test_warmup_stable_decay_shape():
    s = optim.warmup_stable_decay(1.0, 10, 100, 20, end_value=0.1)
    assert s(0) == 0.0 and s(5) == 0.5 and s(10) == 1.0 and s(79) == 1.0 and s(80) == 1.0
    assert s(90) == pytest.approx(0.55) and s(100) == pytest.approx(0.1) and s(150) == pytest.approx(0.1)
    assert float(s(torch.tensor(90))) == s(90)
    full = optim.linear_warmup_linear_decay(2.0, 10, 100)
    ref = optim.warmup_linear(2.0, 10, 100)
    assert all(full(t) == pytest.approx(ref(t)) for t in range(0, 110, 7))
    with pytest.raises(ValueError, match="warmup_steps \\+ decay_steps"):
        optim.warmup_stable_decay(1.0, 60, 100, 50)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, match", [
    (lambda: optim.muon(-1.0), "learning_rate"),
    (lambda: optim.muon(0.02, adam_learning_rate=-1e-3), "adam_learning_rate"),
    (lambda: optim.muon(0.02, momentum=1.5), "momentum"),
    (lambda: optim.muon(0.02, adjust_lr_fn="other"), "adjust_lr_fn"),
    (lambda: optim.adafactor(-0.1), "learning_rate"),
    (lambda: optim.adafactor(0.1, beta2_decay=0.5), "beta2_decay"),
    (lambda: optim.adafactor(0.1, d=0.5), "d"),
    (lambda: optim.schedule_free_adamw(-1.0), "learning_rate"),
    (lambda: optim.schedule_free_adamw(0.1, b1=0.0), "b1"),
    (lambda: optim.schedule_free_adamw(0.1, warmup_steps=-2), "warmup_steps"),
    (lambda: optim.lamb(-1.0), "learning_rate"),
    (lambda: optim.lars(-1.0), "learning_rate"),
    (lambda: optim.sophia(-1.0), "learning_rate"),
    (lambda: optim.sophia(1e-3, update_every=0), "update_every"),
    (lambda: optim.sam(optim.sgd(0.1), rho=-0.1), "rho"),
    (lambda: optim.ema(optim.sgd(0.1), decay=1.5), "decay"),
    (lambda: optim.lookahead(optim.sgd(0.1), sync_period=0), "sync_period"),
    (lambda: optim.lookahead(optim.sgd(0.1), alpha=-0.5), "alpha"),
    (lambda: optim.run_optimizer({"w": torch.zeros(2, 2)}, optimizer="sgd", learning_rate=1e-3, total_steps=10,
                                 warmup_steps=1), "optimizer"),
])
def test_bad_hyperparameters_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_muon_mask_selecting_a_vector_is_an_error_naming_it():
    params = {"fc": {"weight": torch.randn(4, 3), "bias": torch.randn(4)}}
    opt = optim.muon(0.02, mask=["fc.*"])
    with pytest.raises(ValueError, match=r"2-d matrices, but its mask selects 'fc.bias' \(4,\)"):
        opt.init(params)
    state = optim.muon(0.02).init(params)  # the default rule leaves the bias to AdamW
    with pytest.raises(ValueError, match="'fc.bias'"):
        optim.scale_by_muon().update(params, {"mu": params}, params)
    assert "fc.bias" not in tree.flatten(state["muon"])


@pytest.mark.parametrize("make", [lambda: optim.sam(optim.sgd(0.1)), lambda: optim.sophia(1e-3)])
def test_sam_and_sophia_without_a_loss_function_name_loss_fn(make):
    opt = make()
    p = {"w": torch.randn(3)}
    with pytest.raises(ValueError, match="needs loss_fn="):
        opt.update(p, opt.init(p), p)
