"""ensemble of a user's nn.Modules (from_modules, as torch.func.stack_module_state), with buffers."""

import pytest
import torch
import torch.nn.functional as F

import aam_func as af
from aam_func import ensemble, optim


def make(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 2))


def test_members_of_modules_with_buffers_train_as_alone():
    modules = [make(s) for s in range(3)]
    apply, params, buffers = ensemble.from_modules(modules)
    assert params["0.weight"].shape == (3, 7, 5) and buffers["1.running_mean"].shape == (3, 7)

    def loss_fn(p, b, batch):
        out, b = apply(p, b, batch["x"])
        return F.cross_entropy(out, batch["y"]), b

    # sgd, not adam: the bias before BatchNorm has a zero gradient up to rounding, which Adam's
    # normalisation would blow up into rounding-dependent steps
    opt = optim.sgd(0.1, momentum=0.9)
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss_fn, opt, with_buffers=True)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 5, generator=g), "y": torch.randint(0, 2, (8,), generator=g)} for _ in range(4)]
    for batch in batches:
        params, buffers, state, losses = step(params, buffers, state, batch)
    assert losses.shape == (3,)
    for m, module in enumerate(modules):
        a, p, b = af.nn.functionalize(module)
        s = opt.init(p)
        for batch in batches:
            grads, b = torch.func.grad(loss_fn, has_aux=True)(p, b, batch)
            u, s = opt.update(grads, s, p)
            p = optim.apply_updates(p, u)
        for k in p:
            torch.testing.assert_close(params[k][m], p[k], rtol=1e-5, atol=1e-6)
        for k in b:
            torch.testing.assert_close(buffers[k][m], b[k], rtol=1e-5, atol=1e-6)


def test_from_modules_errors():
    with pytest.raises(TypeError, match="non-empty list"):
        ensemble.from_modules([])
    with pytest.raises(ValueError, match="one class"):
        ensemble.from_modules([make(0), torch.nn.Linear(2, 2)])
