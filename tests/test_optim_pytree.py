"""optim on any pytree: a named_parameters() dict, a list and a nested dict follow torch.optim;
masks by glob pick the same leaves in every form; every update has its input's structure."""

import collections

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, strategies as st

from aam_func import optim, tree


def model_params():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def as_form(named, form):
    if form == "named":
        return dict(named)
    if form == "nested":
        return tree.unflatten(dict(named))
    return list(named.values())


GLOBS = {"named": "*.weight", "nested": "*.weight", "list": ["0", "2"]}  # the weights in each form


def torch_run(named, make, grads_seq, decay_weights_only):
    ps = {k: v.clone().requires_grad_(True) for k, v in named.items()}
    if decay_weights_only:
        groups = [{"params": [p for k, p in ps.items() if k.endswith("weight")]},
                  {"params": [p for k, p in ps.items() if not k.endswith("weight")], "weight_decay": 0.0}]
    else:
        groups = list(ps.values())
    opt = make(groups)
    for gs in grads_seq:
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    return {k: p.detach() for k, p in ps.items()}


def ours_run(named, form, opt, grads_seq):
    params = as_form(named, form)
    state = opt.init(params)
    for gs in grads_seq:
        grads = as_form(gs, form)
        updates, state = opt.update(grads, state, params)
        assert type(updates) is type(params)
        params = optim.apply_updates(params, updates)
    assert type(params) is type(as_form(named, form))
    return dict(zip(named, tree.leaves(params)))


CASES = {
    "adamw": (lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1), lambda mask, fused: optim.adamw(1e-2, weight_decay=0.1, mask=mask, fused=fused)),
    "adam": (lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.05), lambda mask, fused: optim.adam(1e-2, weight_decay=0.05, mask=mask, fused=fused)),
    "sgd": (lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.05), lambda mask, fused: optim.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.05, mask=mask)),
}


@pytest.mark.parametrize("form", ["named", "list", "nested"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True])
def test_equals_torch_optim_over_200_steps(form, name, masked):
    named = model_params()
    gen = torch.Generator().manual_seed(1)
    grads_seq = [{k: torch.randn(v.shape, generator=gen) for k, v in named.items()} for _ in range(200)]
    make_torch, make_ours = CASES[name]
    expected = torch_run(named, make_torch, grads_seq, masked)
    for fused in ([None, False] if name != "sgd" else [None]):
        got = ours_run(named, form, make_ours(GLOBS[form] if masked else None, fused), grads_seq)
        for k in named:
            rel = ((got[k] - expected[k]).norm() / expected[k].norm()).item()
            assert rel <= 1e-5, (form, name, fused, k, rel)


@pytest.mark.parametrize("form", ["named", "list", "nested"])
def test_masked_and_freeze_by_glob_same_in_every_form(form):
    named = model_params()
    params = as_form(named, form)
    grads = tree.map(torch.ones_like, params)
    for opt in (optim.freeze(GLOBS[form]), optim.masked(optim.scale(-2.0), GLOBS[form]),
                optim.partition({"w": optim.sgd(0.5), "b": optim.sgd(0.1)},
                                lambda n, x: "w" if x.dim() == 2 else "b")):
        u, _ = opt.update(grads, opt.init(params), params)
        assert type(u) is type(params)
        out = dict(zip(named, tree.leaves(u)))
        if opt is not None and len(opt.init(params)) == 2:  # partition's state: one per label
            assert all(torch.all(out[k] == (-0.5 if k.endswith("weight") else -0.1)) for k in named)
        else:
            picked = {k for k in named if k.endswith("weight")}
            for k in named:
                assert torch.all(out[k] != 1.0) == (k in picked)


names_st = st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,2}){0,2}", fullmatch=True)
leaf_st = st.one_of(st.none(), st.integers(1, 3).map(lambda n: torch.randn(n, generator=torch.Generator().manual_seed(n))))
trees_st = st.recursive(
    leaf_st,
    lambda kids: st.one_of(st.dictionaries(names_st, kids, min_size=1, max_size=3),
                           st.lists(kids, min_size=1, max_size=3), st.lists(kids, min_size=1, max_size=3).map(tuple)),
    max_leaves=8,
).filter(lambda t: not isinstance(t, torch.Tensor) and t is not None)

OPTIMIZERS = [
    optim.sgd(0.1), optim.sgd(0.1, momentum=0.9), optim.adam(1e-2), optim.adamw(1e-2), optim.adamw(1e-2, fused=False),
    optim.lion(1e-3), optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)), optim.clip(0.5),
    optim.masked(optim.adam(1e-2), "*a*"), optim.multi_steps(optim.sgd(0.1), 2), optim.apply_if_finite(optim.adam(1e-2)),
    optim.inject_hyperparams(optim.adamw)(learning_rate=optim.warmup_cosine(1e-2, 2, 10)),
]


@given(trees_st)
def test_every_optimizer_keeps_the_structure(params):
    try:
        tree.flatten(params)
    except ValueError as e:
        assert "several leaves named" in str(e)
        return
    spec = pytree.tree_structure(params, is_leaf=tree.is_leaf)
    grads = tree.map(lambda x: x * 0.5 + 1, params)
    for opt in OPTIMIZERS:
        state = opt.init(params)
        for _ in range(2):
            updates, state = opt.update(grads, state, params)
            assert pytree.tree_structure(updates, is_leaf=tree.is_leaf) == spec
            new = optim.apply_updates(params, updates)
            assert pytree.tree_structure(new, is_leaf=tree.is_leaf) == spec


Pair = collections.namedtuple("Pair", "w b")


def test_namedtuple_params_and_none_leaves():
    params = Pair(torch.ones(2, 2), None)
    opt = optim.adamw(0.1)
    u, s = opt.update(Pair(torch.ones(2, 2), None), opt.init(params), params)
    assert isinstance(u, Pair) and u.b is None and s["mu"].b is None
    assert optim.apply_updates(params, u).b is None


def test_mismatched_structures_and_bad_leaves_name_the_path():
    params = {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"only in grads: 0.b; only in adam state 'mu': 0.bias"):
        opt.update({"0.weight": torch.zeros(2, 2), "0.b": torch.zeros(2)}, state, params)
    with pytest.raises(TypeError, match=r"grads leaf '0.bias' must be a Tensor or None, got str"):
        opt.update({"0.weight": torch.zeros(2, 2), "0.bias": "oops"}, state, params)
    with pytest.raises(TypeError, match=r"params leaf '1' must be a Tensor or None, got float"):
        opt.init([torch.zeros(1), 3.0])
    with pytest.raises(ValueError, match=r"only in params: 1"):
        optim.apply_updates([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)])
