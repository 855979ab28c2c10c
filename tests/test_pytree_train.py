"""train.make_train_step on any params form and on a module with buffers (nn.functionalize)."""

import copy

import torch
import torch.nn.functional as F

import aam_func as af
from aam_func import optim, tree
from aam_func.train import make_train_step


def data(n=5):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, 4, generator=g), "y": torch.randint(0, 2, (8,), generator=g)} for _ in range(n)]


def test_train_step_on_a_named_parameters_dict_and_a_list():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    apply, params, buffers = af.nn.functionalize(model)
    for form in ("named", "list"):
        p = dict(params) if form == "named" else list(params.values())
        to_named = (lambda q: q) if form == "named" else (lambda q: dict(zip(params, q)))

        def loss_fn(q, batch):
            return F.cross_entropy(apply(to_named(q), buffers, batch["x"])[0], batch["y"])

        opt = optim.adamw(1e-2)
        step = make_train_step(loss_fn, opt)
        state, ref, ref_state = step.init(p), p, opt.init(p)
        for batch in data():
            p, state, metrics = step(p, state, batch)
            g = torch.func.grad(loss_fn)(ref, batch)
            u, ref_state = opt.update(g, ref_state, ref)
            ref = optim.apply_updates(ref, u)
        assert type(p) is type(ref) and tree.names(p) == tree.names(ref)
        assert all(torch.equal(a, b) for a, b in zip(tree.leaves(p), tree.leaves(ref)))
        assert int(metrics["tokens"]) == 8 and torch.isfinite(metrics["grad_norm"])


def test_train_step_with_buffers_equals_the_manual_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    apply, params, buffers = af.nn.functionalize(copy.deepcopy(model))

    def loss_fn(p, b, batch):
        out, b = apply(p, b, batch["x"])
        return F.cross_entropy(out, batch["y"]), b

    opt = optim.sgd(0.1, momentum=0.9)
    step = make_train_step(loss_fn, opt, with_buffers=True)
    p, b, s = params, buffers, step.init(params)
    rp, rb, rs = params, buffers, opt.init(params)
    for batch in data():
        p, b, s, metrics = step(p, b, s, batch)
        g, rb = torch.func.grad(loss_fn, has_aux=True)(rp, rb, batch)
        u, rs = opt.update(g, rs, rp)
        rp = optim.apply_updates(rp, u)
    assert all(torch.equal(p[k], rp[k]) for k in p)
    assert all(torch.equal(b[k], rb[k]) for k in b)
    assert int(b["1.num_batches_tracked"]) == 5
    # accumulation threads the buffers through the micro-batches
    step2 = make_train_step(loss_fn, opt, with_buffers=True, accumulate=2)
    _, b2, _, _ = step2(params, buffers, step2.init(params), data(1)[0])
    assert int(b2["1.num_batches_tracked"]) == 2
