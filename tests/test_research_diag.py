"""The exact per-example diagonal GGN against BackPACK's BatchDiagGGNExact (an anchor, test extra)
on an MLP, and against the dense GGN's diagonal through a transformer (attention, LayerNorm:
where BackPACK has no extension)."""

import pytest
import torch
from torch import nn

import aam_func as af
from aam_func.research import Problem, diag_ggn
from aam_func.research.spectral import Flat

D = torch.float64


def test_per_example_diag_ggn_equals_backpack():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchDiagGGNExact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(D)
    x, y = torch.randn(7, 5, dtype=D), torch.randint(0, 4, (7,))
    apply, params, _ = af.nn.functionalize(model)
    problem = Problem(lambda p, xx: apply(p, {}, xx)[0])
    got = diag_ggn(problem, params, x, y, per_example=True, chunk_size=4)
    summed = diag_ggn(problem, params, x, y, method="vmap")  # before BackPACK extends the model in place
    bp_model = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss())(bp_model(x), y)
    with backpack.backpack(BatchDiagGGNExact()):
        loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.diag_ggn_exact_batch, atol=1e-12, rtol=1e-9)
    for name in params:
        torch.testing.assert_close(summed[name], got[name].sum(0), atol=1e-12, rtol=1e-9)


def _dense_ggn(problem, params, x, y):
    flat = Flat(params)
    f = lambda t: problem.apply(flat.tree(t), x)  # noqa: E731
    out = f(flat.vec(params))
    J = torch.func.jacrev(f)(flat.vec(params)).reshape(out.numel(), -1)
    Hf = torch.func.hessian(lambda o: problem.loss_value(o.reshape(out.shape), y))(out.reshape(-1))
    return J.t() @ Hf @ J, flat


def test_diag_ggn_transformer_equals_dense_diagonal():
    cfg = af.ModelConfig(vocab_size=5, d_model=4, n_layers=1, n_heads=2, d_ff=4, max_seq_len=4, dropout=0.0)
    model = af.Transformer(cfg)
    params = af.tree.cast(model.init(seed=0), D)
    ids = torch.tensor([[1, 2, 3], [4, 0, 2]])
    y = torch.tensor([[2, 3, -100], [0, 2, 1]])
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    G, flat = _dense_ggn(problem, params, ids, y)
    got = diag_ggn(problem, params, ids, y)
    torch.testing.assert_close(flat.vec(got), torch.diagonal(G), atol=1e-12, rtol=1e-9)
    with pytest.raises(ValueError, match="per_example"):
        diag_ggn(problem, params, ids, y, per_example=1)
