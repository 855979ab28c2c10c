"""nn.functionalize: any nn.Module as a pure apply(params, buffers, ...) -> (out, new_buffers)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import aam_func as af
from aam_func import optim, tree


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def batches(n=12):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_batchnorm_trains_like_the_module_bit_for_bit():
    ref = bn_model()
    model = copy.deepcopy(ref)
    apply, params, buffers = af.nn.functionalize(model)
    before = {k: v.clone() for k, v in buffers.items()}
    opt = optim.sgd(0.1)  # u = -0.1 g, then p + u: the reference below rounds the same way
    state = opt.init(params)

    def loss_fn(p, b, x, y):
        out, b = apply(p, b, x)
        return F.cross_entropy(out, y), b

    for x, y in batches():
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():  # torch.optim.SGD's add_(g, alpha=-lr) fuses, one rounding less
            for p in ref.parameters():
                p.add_(p.grad * -0.1)
        grads, buffers = torch.func.grad(loss_fn, has_aux=True)(params, buffers, x, y)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    for k, v in ref.named_buffers():
        assert torch.equal(buffers[k], v), k  # running stats bit for bit (fp32)
    for k, v in ref.named_parameters():
        assert torch.equal(params[k], v.detach()), k
    assert int(buffers["1.num_batches_tracked"]) == 12
    # the module and the buffers it was built from were never written
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    # eval mode reads the running stats and returns them unchanged
    model.eval()
    out, same = apply(params, buffers, batches(1)[0][0])
    ref.eval()
    assert torch.equal(out, ref(batches(1)[0][0]).detach())
    assert all(torch.equal(same[k], buffers[k]) for k in buffers)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_parameters_stay_tied():
    torch.manual_seed(0)
    m = Tied()
    apply, params, buffers = af.nn.functionalize(m)
    assert list(params) == ["embed.weight"] and buffers == {}
    ids = torch.tensor([[1, 2, 3]])
    g = torch.func.grad(lambda p: apply(p, buffers, ids)[0].square().sum())(params)
    m.zero_grad()
    m(ids).square().sum().backward()
    torch.testing.assert_close(g["embed.weight"], m.embed.weight.grad)
    doubled = {"embed.weight": params["embed.weight"] * 2}
    out, _ = apply(doubled, buffers, ids)
    e = doubled["embed.weight"]
    torch.testing.assert_close(out, e[ids] @ e.t())  # the new value reaches both uses


def test_other_forms_and_bad_input_name_the_leaf():
    apply, params, buffers = af.nn.functionalize(bn_model())
    x = torch.randn(4, 6)
    out, nested_b = apply(tree.unflatten(dict(params)), tree.unflatten(dict(buffers)), x)
    assert out.shape == (4, 3) and set(nested_b) == {"1"}  # buffers come back in the form given
    with pytest.raises(ValueError, match=r"params hold '1.running_mean', which the module has as buffers"):
        apply({**params, "1.running_mean": buffers["1.running_mean"]}, buffers, x)
    with pytest.raises(ValueError, match=r"buffers hold '0.weight', which the module has as params"):
        apply(params, {**buffers, "0.weight": params["0.weight"]}, x)
    with pytest.raises(ValueError, match=r"unknown: 0.wieght; missing: 0.weight"):
        apply({("0.wieght" if k == "0.weight" else k): v for k, v in params.items()}, buffers, x)
    with pytest.raises(TypeError, match=r"params leaf '3.bias' must be a Tensor, got float"):
        apply({**params, "3.bias": 0.5}, buffers, x)
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        af.nn.functionalize(lambda x: x)
