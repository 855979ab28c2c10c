"""Influence scores: CG / LiSSA / EK-FAC against dense solves in float64, EK-FAC against kronfluence
(an anchor, test extra: Spearman ≥ 0.99), TRAK projections against explicit ones, and a planted
duplicate of the query recovered among 1000 training blocks of a 4-layer GPT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aam_func as af
from aam_func.research import Problem, ggn_vp, influence, kfac, trak
from aam_func.research.spectral import Flat

D = torch.float64


def setup(N=12, dtype=D):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x, y = torch.randn(N, 5, dtype=dtype), torch.randint(0, 3, (N,))
    apply, params, _ = af.nn.functionalize(model)
    problem = Problem(lambda p, xx: apply(p, {}, xx)[0])
    loss_fn = lambda p, b: F.cross_entropy(apply(p, {}, b[0])[0], b[1])  # noqa: E731
    return model, problem, params, x, y, loss_fn


def dense_scores(problem, params, x, y, loss_fn, train, query, damping):
    flat = Flat(params)
    P = flat.size
    G = torch.stack([flat.vec(ggn_vp(problem, params, x, y, flat.tree(e))) for e in torch.eye(P, dtype=D)], 1)
    grads = lambda b: torch.stack([flat.vec(torch.func.grad(loss_fn)(params, (b[0][i:i + 1], b[1][i:i + 1])))  # noqa: E731
                                   for i in range(b[0].shape[0])])
    gt, gq = grads(train), grads(query)
    return gt @ torch.linalg.solve(G + damping * torch.eye(P, dtype=D), gq.t()), G


def test_cg_and_lissa_scores_equal_the_dense_solve():
    model, problem, params, x, y, loss_fn = setup()
    train, query = (x, y), (x[:3] + 0.1, y[:3])
    want, G = dense_scores(problem, params, x, y, loss_fn, train, query, 0.05)
    mv = lambda v: ggn_vp(problem, params, x, y, v)  # noqa: E731
    got = influence.scores(loss_fn, params, train, query, influence.cg_ihvp(mv, damping=0.05, tol=1e-12), chunk_size=5)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)
    top = float(torch.linalg.eigvalsh(G)[-1])
    q1 = (query[0][:1], query[1][:1])
    want_l, _ = dense_scores(problem, params, x, y, loss_fn, train, q1, 0.5)
    lissa = influence.lissa_ihvp(mv, damping=0.5, scale=1.1 * (top + 0.5), depth=150)
    got_l = influence.scores(loss_fn, params, train, q1, lissa)
    torch.testing.assert_close(got_l, want_l, atol=1e-6, rtol=1e-4)
    plain = influence.scores(loss_fn, params, train, query, None)  # gradient dots: TracIn at one checkpoint
    torch.testing.assert_close(plain, af.per_sample.tracin(loss_fn, [(params, 1.0)], train, query), atol=1e-10, rtol=1e-8)


def test_ekfac_ihvp_inverts_the_damped_ekfac_matrix():
    model, problem, params, x, y, loss_fn = setup()
    facs = kfac.eigen_correct(problem, params, x, y, kfac.collect(problem, params, x, y, fisher="empirical", bias="augment"))
    b = af.tree.map(lambda t: torch.randn_like(t), params)
    sol = influence.ekfac_ihvp(facs, damping=0.1)(b)
    for name, f in facs.factors.items():
        QA, QG, lam = f.eig
        M = torch.cat([sol[name], sol[f.bias].reshape(-1, 1)], 1)
        back = QG @ ((lam + 0.1) * (QG.t() @ M @ QA)) @ QA.t()
        torch.testing.assert_close(back, torch.cat([b[name], b[f.bias].reshape(-1, 1)], 1), atol=1e-10, rtol=1e-8)
    with pytest.raises(TypeError, match="factors"):
        influence.ekfac_ihvp({}, damping=0.1)
    with pytest.raises(ValueError, match="damping"):
        influence.cg_ihvp(lambda v: v, damping=0.0)
    with pytest.raises(ValueError, match="scale"):
        influence.lissa_ihvp(lambda v: v, damping=0.1, scale=-1.0)


def test_ekfac_scores_match_kronfluence(tmp_path):
    kron = pytest.importorskip("kronfluence")
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from scipy.stats import spearmanr

    model, problem, params, x, y, loss_fn = setup(N=64, dtype=torch.float32)
    xq, yq = x[:8] + 0.05 * torch.randn(8, 5), y[:8]

    class Cls(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")
            return F.cross_entropy(logits, batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    damping = 1e-3
    ours = copy.deepcopy(model).double()
    wrapped = kron.prepare_model(model, Cls())
    an = kron.Analyzer("t", wrapped, Cls(), cpu=True, output_dir=str(tmp_path), disable_tqdm=True)
    ds, dq = torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(xq, yq)
    an.fit_all_factors("f", ds, per_device_batch_size=16,
                       factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True), overwrite_output_dir=True)
    an.compute_pairwise_scores("s", "f", dq, ds, per_device_query_batch_size=8, per_device_train_batch_size=16,
                               score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
    want = an.load_pairwise_scores("s")["all_modules"].t().double()  # (N_train, N_query)

    apply, p64, _ = af.nn.functionalize(ours)
    pb = Problem(lambda p, xx: apply(p, {}, xx)[0])
    lf = lambda p, b: F.cross_entropy(apply(p, {}, b[0])[0], b[1], reduction="sum")  # noqa: E731
    x64, xq64 = x.double(), xq.double()
    facs = kfac.eigen_correct(pb, p64, x64, y, kfac.collect(pb, p64, x64, y, fisher="empirical", bias="augment"))
    got = influence.scores(lf, p64, (x64, y), (xq64, yq), influence.ekfac_ihvp(facs, damping=damping))
    rhos = [spearmanr(got[:, j].numpy(), want[:, j].numpy()).statistic for j in range(want.shape[1])]
    print(f"Spearman per query: min {min(rhos):.5f}, mean {sum(rhos) / len(rhos):.5f}")
    assert min(rhos) >= 0.99, rhos


def test_trak_projection_equals_the_explicit_projection():
    model, problem, params, x, y, loss_fn = setup(N=6)
    phi = trak.project(loss_fn, params, (x, y), side=3, small_dim=4, seed=7, chunk_size=4)
    g = af.per_sample.grads(loss_fn, params, (x, y), method="vmap")
    want = []
    for i in range(6):
        parts = []
        for k, name in enumerate(sorted(["0.weight", "2.weight"])):
            PL = trak._gauss((3, params[name].shape[0]), 7 + 2 * k, torch.float32, "cpu").double()
            PR = trak._gauss((3, params[name].shape[1]), 8 + 2 * k, torch.float32, "cpu").double()
            parts.append((PL @ g[name][i] @ PR.t()).reshape(-1))
        small = torch.cat([g[n][i].reshape(-1) for n in sorted(["0.bias", "2.bias"])])
        parts.append(small @ trak._gauss((small.numel(), 4), 6, torch.float32, "cpu").double())
        want.append(torch.cat(parts))
    want = torch.stack(want) / (2 * 9 + 4) ** 0.5
    torch.testing.assert_close(phi.double(), want, atol=1e-5, rtol=1e-4)
    s = trak.trak_scores(loss_fn, params, (x, y), (x[:2], y[:2]), side=3, small_dim=4)
    assert s.shape == (6, 2) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="side"):
        trak.project(loss_fn, params, (x, y), side=0)


def gpt_blocks(n_train=1000, T=12, seed=0):
    cfg = af.ModelConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=T, dropout=0.0)
    model = af.Transformer(cfg)
    params = model.init(seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n_train, T), generator=g)
    query = torch.randint(0, 32, (1, T), generator=g)
    planted = 417
    ids[planted] = query[0]
    loss_fn = lambda p, b: model.apply(p, b, labels=b)["loss"]  # noqa: E731
    return model, params, ids, query, planted, loss_fn


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ekfac", "cg", "trak"])
def test_gpt_influence_finds_the_planted_duplicate(how):
    model, params, ids, query, planted, loss_fn = gpt_blocks()
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
    if how == "trak":
        s = trak.trak_scores(loss_fn, params, ids, query, damping=1e-2, side=8, chunk_size=250)[:, 0]
    else:
        fit = slice(0, 200)  # the curvature from a subset of the training blocks
        if how == "ekfac":
            facs = kfac.collect(problem, params, ids[fit], targets[fit], fisher="empirical")
            ihvp = influence.ekfac_ihvp(kfac.eigen_correct(problem, params, ids[fit], targets[fit], facs), damping=1e-3)
        else:
            ihvp = influence.cg_ihvp(lambda v: ggn_vp(problem, params, ids[:64], targets[:64], v), damping=1e-2,
                                     iterations=20)
        s = influence.scores(loss_fn, params, ids, query, ihvp, chunk_size=250)[:, 0]
    top5 = torch.topk(s, 5).indices.tolist()
    assert planted in top5, (how, top5)
