"""LoRA on any params form and on nn.functionalize's result."""

import torch

import aam_func as af
from aam_func import tree
from aam_func.peft import lora


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def test_lora_on_functionalize_factored_equals_merged():
    fm = af.nn.functionalize(mlp())
    apply, params, buffers = fm
    spec, adapters = lora.init(fm, targets=["0", "2"], rank=2, alpha=4, b_std=0.1)
    assert spec.names == ("0", "2")
    x = torch.randn(5, 6)
    run = lambda p, x: apply(p, buffers, x)[0]  # noqa: E731
    factored = spec.apply(run, params, adapters, x)
    merged_params = spec.merged(params, adapters)
    assert list(merged_params) == list(params)  # the flat dict stays flat, same keys
    torch.testing.assert_close(factored, run(merged_params, x))
    g = torch.func.grad(lambda a: spec.apply(run, params, a, x).square().sum())(adapters)
    assert tree.names(g) == tree.names(adapters)
    assert all(v.abs().sum() > 0 for v in tree.leaves(g))


def test_lora_merged_keeps_every_form():
    named = {k: v.detach() for k, v in mlp().named_parameters()}
    spec, adapters = lora.init(named, targets="*", rank=2, alpha=2, b_std=0.1)
    assert spec.names == ("0", "2")
    for form in (named, tree.unflatten(dict(named))):
        out = spec.merged(form, adapters)
        assert type(out) is type(form) and tree.names(out) == tree.names(form)
        back = spec.unmerge(out, adapters)
        for a, b in zip(tree.leaves(back), tree.leaves(form)):
            torch.testing.assert_close(a, b)
