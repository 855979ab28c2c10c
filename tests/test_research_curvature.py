"""Matrix-free curvature products against dense matrices (torch.func.hessian / jacrev) in float64,
and Hutchinson / Lanczos / CG against the dense trace, eigenvalues and solve."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev

import aam_func as af
from aam_func.research import Problem, fisher_vp, ggn_vp, hessian_vp
from aam_func.research.spectral import Flat, cg, hutchinson_diag, hutchinson_trace, lanczos

D = torch.float64


def mlp_problem(loss="cross_entropy", reduction="mean", B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"l1": {"weight": torch.randn(4, 3, generator=g, dtype=D), "bias": torch.randn(4, generator=g, dtype=D)},
              "l2": {"weight": torch.randn(3, 4, generator=g, dtype=D), "bias": torch.randn(3, generator=g, dtype=D)}}

    def apply(p, x):
        h = torch.tanh(F.linear(x, p["l1"]["weight"], p["l1"]["bias"]))
        return F.linear(h, p["l2"]["weight"], p["l2"]["bias"])

    x = torch.randn(B, 3, generator=g, dtype=D)
    y = torch.randint(0, 3, (B,), generator=g) if loss == "cross_entropy" else torch.randn(B, 3, generator=g, dtype=D)
    return Problem(apply, loss=loss, reduction=reduction), params, x, y


def gpt_problem(n_layers=4, B=3, T=5, seed=0, backend="auto"):
    cfg = af.ModelConfig(vocab_size=11, d_model=8, n_layers=n_layers, n_heads=2, d_ff=12, max_seq_len=8,
                         dropout=0.0, attention_backend=backend)
    model = af.Transformer(cfg)
    params = af.tree.cast(model.init(seed=seed), D)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (B, T), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)  # position t predicts ids[t+1]
    return Problem(lambda p, x: model.apply(p, x)["logits"]), params, ids, targets


def dense(problem, params, x, y, reverse_hessian=False):
    """(H, G, J, H_f): the loss Hessian, the GGN, the output Jacobian, the output Hessian, dense.
    ``reverse_hessian``: H by reverse-over-reverse (``torch.autograd.functional.hessian``):
    on the transformer ``torch.func.hessian`` (jacfwd over jacrev, a vmap over jvps) disagrees
    with both reverse-over-reverse and unbatched forward-over-reverse at ``ln_f.weight``."""
    flat = Flat(params)
    theta = flat.vec(params)
    f = lambda t: problem.apply(flat.tree(t), x)  # noqa: E731
    out = f(theta)
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    Hf = hessian(lambda o: problem.loss_value(o.reshape(out.shape), y))(out.reshape(-1))
    loss = lambda t: problem.loss_value(f(t), y)  # noqa: E731
    H = torch.autograd.functional.hessian(loss, theta) if reverse_hessian else hessian(loss)(theta)
    return H, J.t() @ Hf @ J, J, Hf, flat


def random_vec(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return af.tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)


@pytest.mark.parametrize("loss,reduction", [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean")])
def test_products_equal_dense_mlp(loss, reduction):
    problem, params, x, y = mlp_problem(loss, reduction)
    H, G, J, Hf, flat = dense(problem, params, x, y)
    v = random_vec(params)
    vv = flat.vec(v)
    torch.testing.assert_close(flat.vec(hessian_vp(problem, params, x, y, v)), H @ vv, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(flat.vec(ggn_vp(problem, params, x, y, v)), G @ vv, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(flat.vec(ggn_vp(problem, params, x, y, v, chunk_size=2)), G @ vv, atol=1e-10, rtol=1e-8)
    # true Fisher is the GGN for these likelihoods
    torch.testing.assert_close(flat.vec(fisher_vp(problem, params, x, y, v, kind="true")), G @ vv, atol=1e-10, rtol=1e-8)


def test_empirical_fisher_equals_per_example_grad_outer_products():
    problem, params, x, y = mlp_problem(reduction="mean")
    flat = Flat(params)
    v = random_vec(params)
    B = x.shape[0]
    E = torch.zeros(flat.size, flat.size, dtype=D)
    for n in range(B):  # c Σ_n g_n g_nᵀ with g_n the gradient of example n's summed loss
        g = torch.func.grad(lambda p: problem.loss_value(problem.apply(p, x[n:n + 1]), y[n:n + 1], 1.0))(params)
        gv = flat.vec(g)
        E += torch.outer(gv, gv) / B
    got = flat.vec(fisher_vp(problem, params, x, y, v, kind="empirical", chunk_size=3))
    torch.testing.assert_close(got, E @ flat.vec(v), atol=1e-10, rtol=1e-8)


def test_mc_fisher_converges_to_ggn():
    problem, params, x, y = mlp_problem(B=4)
    _, G, _, _, flat = dense(problem, params, x, y)
    v = random_vec(params)
    got = flat.vec(fisher_vp(problem, params, x, y, v, kind="mc", samples=20000, generator=torch.Generator().manual_seed(0)))
    want = G @ flat.vec(v)
    assert (got - want).norm() / want.norm() < 0.06
    with pytest.raises(ValueError, match="kind"):
        fisher_vp(problem, params, x, y, v, kind="fisher")
    with pytest.raises(ValueError, match="samples"):
        fisher_vp(problem, params, x, y, v, kind="mc", samples=0)


def test_per_example_products_sum_to_the_batch_and_match_dense():
    problem, params, x, y = mlp_problem()
    flat = Flat(params)
    v = random_vec(params)
    per = ggn_vp(problem, params, x, y, v, per_example=True, chunk_size=2)
    assert all(t.shape[0] == x.shape[0] for t in af.tree.leaves(per))
    summed = af.tree.map(lambda t: t.sum(0), per)
    torch.testing.assert_close(flat.vec(summed), flat.vec(ggn_vp(problem, params, x, y, v)), atol=1e-10, rtol=1e-8)
    c = problem.scale(y)
    for n in (0, 3):  # example n's term: c Jₙᵀ H Jₙ v with the batch's scale
        one = Problem(problem.apply, problem.loss, "sum")
        want = flat.vec(ggn_vp(one, params, x[n:n + 1], y[n:n + 1], v))
        torch.testing.assert_close(flat.vec(af.tree.map(lambda t: t[n], per)), c * want, atol=1e-10, rtol=1e-8)
    per_h = hessian_vp(problem, params, x, y, v, per_example=True)
    torch.testing.assert_close(flat.vec(af.tree.map(lambda t: t.sum(0), per_h)),
                               flat.vec(hessian_vp(problem, params, x, y, v)), atol=1e-10, rtol=1e-8)
    per_e = fisher_vp(problem, params, x, y, v, kind="empirical", per_example=True)
    torch.testing.assert_close(flat.vec(af.tree.map(lambda t: t.sum(0), per_e)),
                               flat.vec(fisher_vp(problem, params, x, y, v, kind="empirical")), atol=1e-10, rtol=1e-8)


def test_gpt_ggn_product_equals_dense():
    """Attention, LayerNorm, tied embeddings: the GGN product through a one-block transformer."""
    cfg = af.ModelConfig(vocab_size=5, d_model=4, n_layers=1, n_heads=2, d_ff=4, max_seq_len=4, dropout=0.0)
    model = af.Transformer(cfg)
    params = af.tree.cast(model.init(seed=0), D)
    ids = torch.tensor([[1, 2, 3], [4, 0, 2]])
    y = torch.tensor([[2, 3, -100], [0, 2, -100]])
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    flat = Flat(params)
    f = lambda t: problem.apply(flat.tree(t), ids)  # noqa: E731
    out = f(flat.vec(params))
    J = jacrev(f)(flat.vec(params)).reshape(out.numel(), -1)
    Hf = hessian(lambda o: problem.loss_value(o.reshape(out.shape), y))(out.reshape(-1))
    v = random_vec(params)
    torch.testing.assert_close(flat.vec(ggn_vp(problem, params, ids, y, v, chunk_size=1)), J.t() @ Hf @ J @ flat.vec(v),
                               atol=1e-10, rtol=1e-8)


@pytest.mark.slow
def test_gpt_ggn_and_hessian_products_equal_dense():
    """Attention, LayerNorm, tied embeddings: the GGN product through the whole transformer."""
    problem, params, ids, y = gpt_problem(n_layers=1, B=2, T=4, backend="math")  # math: has a double backward
    H, G, J, Hf, flat = dense(problem, params, ids, y, reverse_hessian=True)
    v = random_vec(params)
    vv = flat.vec(v)
    torch.testing.assert_close(flat.vec(ggn_vp(problem, params, ids, y, v, chunk_size=1)), G @ vv, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(flat.vec(hessian_vp(problem, params, ids, y, v)), H @ vv, atol=1e-10, rtol=1e-8)


@pytest.mark.slow
def test_gpt_4_layers_ggn_equals_dense():
    problem, params, ids, y = gpt_problem(n_layers=4, B=2, T=4)
    _, G, _, _, flat = dense(problem, params, ids, y)
    v = random_vec(params)
    got = flat.vec(ggn_vp(problem, params, ids, y, v))
    torch.testing.assert_close(got, G @ flat.vec(v), atol=1e-10, rtol=1e-8)
    per = ggn_vp(problem, params, ids, y, v, per_example=True)
    torch.testing.assert_close(flat.vec(af.tree.map(lambda t: t.sum(0), per)), got, atol=1e-10, rtol=1e-8)


def test_hutchinson_and_lanczos_converge_to_dense():
    problem, params, x, y = mlp_problem(B=6)
    H, G, _, _, flat = dense(problem, params, x, y)
    mv = lambda v: ggn_vp(problem, params, x, y, v)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    tr = hutchinson_trace(mv, params, samples=150, generator=g)
    assert abs(float(tr) - float(torch.trace(G))) < 0.1 * float(torch.trace(G))
    diag = flat.vec(hutchinson_diag(mv, params, samples=150, generator=g))
    assert (diag - torch.diagonal(G)).norm() < 0.3 * torch.diagonal(G).norm()
    vals, vecs = lanczos(mv, params, k=3, iterations=flat.size, generator=g)
    want = torch.linalg.eigvalsh(G).flip(0)[:3]
    torch.testing.assert_close(vals, want, atol=1e-8, rtol=1e-8)
    top = torch.cat([t.reshape(3, -1) for t in af.tree.leaves(vecs)], 1)[0]
    torch.testing.assert_close(G @ top, vals[0] * top, atol=1e-8, rtol=1e-6)
    # few iterations already find the top eigenvalue of the indefinite Hessian closely
    hv = lambda v: hessian_vp(problem, params, x, y, v)  # noqa: E731
    vals_h, _ = lanczos(hv, params, k=1, iterations=20, generator=g)
    assert abs(float(vals_h[0]) - float(torch.linalg.eigvalsh(H)[-1])) < 1e-6


def test_cg_solves_the_damped_system():
    problem, params, x, y = mlp_problem(B=6)
    _, G, _, _, flat = dense(problem, params, x, y)
    b = random_vec(params, seed=3)
    sol = cg(lambda v: ggn_vp(problem, params, x, y, v), b, damping=0.1, iterations=200, tol=1e-13)
    want = torch.linalg.solve(G + 0.1 * torch.eye(flat.size, dtype=D), flat.vec(b))
    torch.testing.assert_close(flat.vec(sol), want, atol=1e-9, rtol=1e-8)


def test_bad_arguments_are_named():
    problem, params, x, y = mlp_problem()
    v = random_vec(params)
    with pytest.raises(ValueError, match="loss"):
        Problem(problem.apply, loss="hinge")
    with pytest.raises(ValueError, match="reduction"):
        Problem(problem.apply, reduction="none")
    with pytest.raises(TypeError, match="callable"):
        Problem(3)
    with pytest.raises(ValueError, match="targets"):
        ggn_vp(problem, params, x, y[:2], v)
    with pytest.raises(ValueError, match="targets must be integer class ids"):
        ggn_vp(problem, params, x, y.to(D), v)
    with pytest.raises(ValueError, match="vector"):
        ggn_vp(problem, params, x, y, {"l1": v["l1"]})
    with pytest.raises(ValueError, match="ignore_index"):
        ggn_vp(problem, params, x, torch.full_like(y, -100), v)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(lambda v: v, params, k=0)
    with pytest.raises(ValueError, match="damping"):
        cg(lambda v: v, v, damping=-1.0)
    with pytest.raises(ValueError, match="samples"):
        hutchinson_trace(lambda v: v, params, samples=0)
