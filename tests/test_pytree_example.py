"""examples/any_module.py: a transformers BERT as a flat named_parameters() dict, trained with
adamw, its per-example gradient norms equal to a loop over the examples."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import aam_func as af
from aam_func import optim

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("any_module", os.path.join(ROOT, "examples", "any_module.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_bert_named_parameters_per_sample_norms_and_adamw():
    ex = load_example()
    apply, params, buffers = af.nn.functionalize(ex.build_model(0))
    assert "bert.encoder.layer.0.attention.self.query.weight" in params

    def loss_fn(p, batch):
        return F.cross_entropy(apply(p, buffers, input_ids=batch["input_ids"])[0].logits, batch["labels"])

    batch = ex.make_data(4, 12, 0)
    norms = af.per_sample.norms(loss_fn, params, batch)
    loop = []
    for i in range(4):
        g = torch.func.grad(loss_fn)(params, {k: v[i:i + 1] for k, v in batch.items()})
        loop.append(torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())).float())
    torch.testing.assert_close(norms, torch.stack(loop), rtol=1e-5, atol=1e-6)
    opt = optim.adamw(1e-2, mask=optim.decay_rule)
    u, _ = opt.update(torch.func.grad(loss_fn)(params, batch), opt.init(params), params)
    new = optim.apply_updates(params, u)
    assert list(new) == list(params) and loss_fn(new, batch) < loss_fn(params, batch)
