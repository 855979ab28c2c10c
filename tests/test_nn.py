"""bind(): specs as torch.nn.Modules, with functional_call and torch.optim."""

import pytest
import torch
from torch.func import functional_call

import aam_func as af
from aam_func import tree


def setup():
    cfg = af.ModelConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.0)
    m = af.Transformer(cfg)
    return m, m.init(seed=0), torch.randint(0, 31, (2, 8))


def test_named_parameters_are_flatten_and_share_storage():
    m, p, _ = setup()
    mod = af.bind(m, p)
    named = dict(mod.named_parameters())
    assert list(named) == tree.names(p)
    assert all(named[n].data_ptr() == t.data_ptr() for n, t in tree.flatten(p).items())
    assert list(mod.state_dict()) == tree.names(p)


def test_functional_call_equals_apply():
    m, p, ids = setup()
    mod = af.bind(m, p)
    flat = {k: v + 0.01 * torch.randn_like(v) for k, v in tree.flatten(p).items()}
    a = functional_call(mod, flat, (ids,), {"labels": ids})
    b = m.apply(tree.unflatten(flat), ids, labels=ids)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    g1 = torch.func.grad(lambda f: functional_call(mod, f, (ids,), {"labels": ids})["loss"])(flat)
    g2 = torch.func.grad(lambda f: m.apply(tree.unflatten(f), ids, labels=ids)["loss"])(flat)
    assert all(torch.allclose(g1[k], g2[k]) for k in flat)


def test_trains_with_torch_optim():
    m, p, ids = setup()
    mod = af.bind(m, tree.map(torch.clone, p))
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = mod(ids, labels=ids)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    assert not torch.equal(mod.params()["embed"]["weight"], p["embed"]["weight"])


def test_bind_errors():
    m, p, _ = setup()
    with pytest.raises(TypeError, match="no method 'nope'"):
        af.bind(m, p, method="nope")
    with pytest.raises(TypeError, match="must be a Tensor"):
        af.bind(m, {"a": 3})
