"""Ensembles: N members trained at once by vmap equal each member trained alone."""

import pytest
import torch

import aam_func as af
from aam_func import ensemble, optim, tree


def small():
    cfg = af.ModelConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0, attention_backend="math")
    return af.Transformer(cfg)


@pytest.mark.parametrize(
    "per_member, dtype, opt",
    [
        (False, torch.float64, optim.adamw(1e-2, weight_decay=0.1)),
        (True, torch.float64, optim.adamw(1e-2, weight_decay=0.1)),
        (False, torch.float32, optim.sgd(0.5, momentum=0.9)),
    ],
    ids=["shared-batch-adamw-f64", "own-batches-adamw-f64", "shared-batch-sgd-f32"],
)
def test_ensemble_of_four_equals_each_trained_alone(per_member, dtype, opt):
    # float64 for Adam: its g/√v update turns float32 reduction-order noise (vmapped vs plain
    # matmuls) into ~1e-5 differences that are not ensemble errors.
    model = small()
    loss = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731
    seeds = [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 12) if per_member else (3, 12)
    batches = [torch.randint(0, 37, shape, generator=g) for _ in range(3)]
    params = ensemble.init(model, seeds, dtype=dtype)
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss, opt, batch_per_member=per_member)
    for ids in batches:
        params, state, losses = step(params, state, {"input_ids": ids, "labels": ids})
        assert losses.shape == (4,)
    for m, seed in enumerate(seeds):
        p = model.init(seed=seed, dtype=dtype)
        s = opt.init(p)
        for ids in batches:
            ids_m = ids[m] if per_member else ids
            b = {"input_ids": ids_m, "labels": ids_m}
            gr = torch.func.grad(loss)(p, b)
            u, s = opt.update(gr, s, p)
            p = optim.apply_updates(p, u)
        alone = tree.map(lambda x: x[m], params)
        diff = max((a - b).abs().max().item() for a, b in zip(tree.leaves(alone), tree.leaves(p)))
        assert diff <= 1e-6
    members = ensemble.unstack(params)
    assert len({float(tree.leaves(p)[0].sum()) for p in members}) == 4  # members really differ


def test_stack_unstack_and_apply():
    model = small()
    ps = [model.init(seed=s) for s in (3, 4)]
    st = ensemble.stack(ps)
    assert all(x.shape[0] == 2 for x in tree.leaves(st))
    back = ensemble.unstack(st)
    assert all(torch.equal(a, b) for p, q in zip(ps, back) for a, b in zip(tree.leaves(p), tree.leaves(q)))
    ids = torch.randint(0, 37, (2, 5))
    logits = ensemble.apply(lambda p, x: model.apply(p, x)["logits"], st, ids)
    torch.testing.assert_close(logits[1], model.apply(ps[1], ids)["logits"])


def test_bad_inputs():
    model = small()
    with pytest.raises(ValueError, match="at least one"):
        ensemble.stack([])
    with pytest.raises(ValueError, match="distinct"):
        ensemble.init(model, [1, 1])
    a = model.init(seed=0)
    b = dict(a)
    b.pop("ln_f")
    with pytest.raises(ValueError, match="ensemble member 1"):
        ensemble.stack([a, b])
