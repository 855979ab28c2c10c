"""GGN / Fisher products and KFAC / EK-FAC factors against curvlinops (an anchor, test extra) on an
MLP and a small CNN, in float64; KFAC through the transformer; the KFAC-preconditioned optimizer."""

import pytest
import torch
from torch import nn

import aam_func as af
from aam_func.research import Problem, fisher_vp, ggn_vp, kfac
from aam_func.research.spectral import Flat

curvlinops = pytest.importorskip("curvlinops")
D = torch.float64


def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 4, bias=bias)).to(D)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 4)).to(D)


def data(model, N=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((N, 5) if isinstance(model[0], nn.Linear) else (N, 2, 6, 6), generator=g, dtype=D)
    return x, torch.randint(0, 4, (N,), generator=g)


def problem_of(model, reduction="mean"):
    apply, params, _ = af.nn.functionalize(model)
    return Problem(lambda p, x: apply(p, {}, x)[0], reduction=reduction), params


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_and_empirical_fisher_products_equal_curvlinops(make, reduction):
    model = make()
    x, y = data(model)
    problem, params = problem_of(model, reduction)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    plist = list(model.parameters())
    v = [torch.randn(p.shape, dtype=D, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(plist)]
    vt = dict(zip(params, v))
    flat = Flat(params)
    G = curvlinops.GGNLinearOperator(model, loss, plist, [(x, y)], check_deterministic=False)
    E = curvlinops.EFLinearOperator(model, loss, plist, [(x, y)], check_deterministic=False)
    want_g = torch.cat([t.reshape(-1) for t in G @ v])
    want_e = torch.cat([t.reshape(-1) for t in E @ v])
    torch.testing.assert_close(flat.vec(ggn_vp(problem, params, x, y, vt, chunk_size=3)), want_g, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(flat.vec(fisher_vp(problem, params, x, y, vt, kind="empirical")), want_e,
                               atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_kfac_factors_equal_curvlinops(make, fisher):
    model = make()
    x, y = data(model)
    problem, params = problem_of(model)
    op = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                       fisher_type=fisher, check_deterministic=False, separate_weight_and_bias=True)
    op.compute_kronecker_factors()
    got = kfac.collect(problem, params, x, y, fisher=fisher, chunk_size=4)
    assert not got.skipped
    names = {n.rsplit(".", 1)[0] for n in params}
    assert set(op._gradient_covariances) == names
    for mod in names:
        f = got.factors[f"{mod}.weight"]
        assert f.bias == f"{mod}.bias"
        torch.testing.assert_close(f.A, op._input_covariances[mod], atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(f.G, op._gradient_covariances[mod], atol=1e-12, rtol=1e-9)


@pytest.mark.slow
def test_kfac_mc_factors_converge_to_type2():
    model = mlp()
    x, y = data(model)
    problem, params = problem_of(model)
    t2 = kfac.collect(problem, params, x, y, fisher="type-2")
    mc = kfac.collect(problem, params, x, y, fisher="mc", samples=400, generator=torch.Generator().manual_seed(0))
    for k, f in t2.factors.items():
        torch.testing.assert_close(mc.factors[k].A, f.A)
        assert (mc.factors[k].G - f.G).norm() < 0.12 * f.G.norm()


def test_kfac_is_exact_for_one_example_and_one_layer():
    """N = 1, one linear layer: A ⊗ G is that example's GGN block exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).to(D)
    x, y = torch.randn(1, 4, dtype=D), torch.tensor([2])
    problem, params = problem_of(model)
    f = kfac.collect(problem, params, x, y).factors["0.weight"]
    v = {"0.weight": torch.randn(3, 4, dtype=D)}
    want = ggn_vp(problem, params, x, y, v)["0.weight"]
    torch.testing.assert_close(f.G @ v["0.weight"] @ f.A, want, atol=1e-12, rtol=1e-10)
    # the inverse product undoes it (damped)
    inv = kfac.inverse_product(kfac.collect(problem, params, x, y), {"0.weight": f.G @ v["0.weight"] @ f.A + 1e-3 * v["0.weight"]},
                               damping=1e-3)
    torch.testing.assert_close(inv["0.weight"], v["0.weight"], atol=1e-8, rtol=1e-6)


def test_ekfac_eigenvalues_equal_curvlinops():
    model = mlp()
    x, y = data(model)
    problem, params = problem_of(model)
    op = curvlinops.EKFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                        fisher_type="empirical", check_deterministic=False,
                                        separate_weight_and_bias=False)
    v = [torch.randn(p.shape, dtype=D, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
    want = torch.cat([t.reshape(-1) for t in op @ v])
    facs = kfac.eigen_correct(problem, params, x, y, kfac.collect(problem, params, x, y, fisher="empirical", bias="augment"))
    # apply F = Q diag(Λ) Qᵀ (no damping) weight by weight, with the augmented bias
    flat = Flat(params)
    got = {}
    for name, f in facs.factors.items():
        QA, QG, lam = f.eig
        M = torch.cat([dict(zip(params, v))[name], dict(zip(params, v))[f.bias].reshape(-1, 1)], 1)
        P = QG @ (lam * (QG.t() @ M @ QA)) @ QA.t()
        got[name], got[f.bias] = P[:, :-1], P[:, -1]
    torch.testing.assert_close(flat.vec({n: got[n] for n in params}), want, atol=1e-10, rtol=1e-8)


def test_kfac_through_the_transformer_finds_every_linear_use():
    cfg = af.ModelConfig(vocab_size=13, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8, dropout=0.0)
    model = af.Transformer(cfg)
    params = af.tree.cast(model.init(seed=0), D)
    ids = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(0))
    y = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    facs = kfac.collect(problem, params, ids, y, fisher="empirical")
    linear = {n for n, t in af.tree.flatten(params).items() if t.dim() == 2 and not n.startswith("embed")}
    assert set(facs.factors) == linear
    assert set(facs.skipped) == {"embed.weight"}  # tied: a lookup and the LM head
    for f in facs.factors.values():
        assert torch.linalg.eigvalsh(f.A).min() > -1e-10 and torch.linalg.eigvalsh(f.G).min() > -1e-10


def test_kfac_bad_arguments():
    model = mlp()
    x, y = data(model)
    problem, params = problem_of(model)
    with pytest.raises(ValueError, match="fisher"):
        kfac.collect(problem, params, x, y, fisher="true")
    with pytest.raises(ValueError, match="bias"):
        kfac.collect(problem, params, x, y, bias="merge")
    facs = kfac.collect(problem, params, x, y)
    with pytest.raises(ValueError, match="damping"):
        kfac.inverse_product(facs, params, damping=0.0)
    with pytest.raises(ValueError, match="no gradient for the factored weight '0.weight'"):
        kfac.inverse_product(facs, {"2.weight": params["2.weight"]}, damping=1e-3)


def test_kfac_preconditioned_sgd_steps_by_the_inverse_factors_and_trains():
    from aam_func.research.precondition import kfac_preconditioned

    model = mlp()
    x, y = data(model, N=32)
    problem, params = problem_of(model)
    opt = kfac_preconditioned(af.optim.sgd(0.5), damping=1e-2, decay=0.5)
    state = opt.init(params)
    loss = lambda p: problem.loss_value(problem.apply(p, x), y)  # noqa: E731
    g = torch.func.grad(loss)(params)
    with pytest.raises(ValueError, match="factors"):
        opt.update(g, state, params)
    facs = kfac.collect(problem, params, x, y)
    upd, state = opt.update(g, state, params, factors=facs)
    want = kfac.inverse_product(facs, g, damping=1e-2)
    for n in params:
        torch.testing.assert_close(upd[n], -0.5 * want[n])
    start = float(loss(params))
    for step in range(15):
        params = af.optim.apply_updates(params, upd)
        g = torch.func.grad(loss)(params)
        upd, state = opt.update(g, state, params, factors=kfac.collect(problem, params, x, y) if step % 3 == 0 else None)
    assert float(loss(params)) < 0.5 * start
    with pytest.raises(ValueError, match="damping"):
        kfac_preconditioned(af.optim.sgd(0.1), damping=0)
    with pytest.raises(TypeError, match="inner"):
        kfac_preconditioned("sgd")


def test_kfac_finds_lora_adapters_inside_lora_intercept():
    """LoRA's factored path (its own Intercept client) runs F.linear(F.linear(x, A), B): both
    adapters are linear-like uses; with one example and one row, A ⊗ G is the gradient's outer product."""
    from aam_func.peft import lora

    cfg = af.ModelConfig(vocab_size=13, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8, dropout=0.0)
    model = af.Transformer(cfg)
    params = af.tree.cast(model.init(seed=0), D)
    spec, adapters = lora.init(params, targets=["*.attn.qkv"], rank=2, alpha=4)
    adapters = af.tree.map(lambda t: t.to(D) + 0.1, adapters)  # the params' dtype: a cast copy is another tensor
    problem = Problem(lambda a, x: spec.apply(model.apply, params, a, x)["logits"])
    ids, y = torch.tensor([[3]]), torch.tensor([[5]])
    facs = kfac.collect(problem, adapters, ids, y, fisher="empirical")
    names = set(af.tree.flatten(adapters))
    assert set(facs.factors) == names and not facs.skipped
    grads = af.tree.flatten(torch.func.grad(lambda a: problem.loss_value(problem.apply(a, ids), y))(adapters))
    for name in names:
        f = facs.factors[name]
        V = torch.randn(grads[name].shape, dtype=D)
        torch.testing.assert_close(f.G @ V @ f.A, grads[name] * (grads[name] * V).sum(), atol=1e-12, rtol=1e-9)
