"""torch.func.hessian (jacfwd over jacrev) through aam_func's LayerNorm equals reverse-over-reverse.

torch 2.13's fused layer_norm gives a wrong, asymmetric Hessian there when the norm's input
depends on the differentiated params (shown first on plain F.layer_norm, so that the test
fails if torch's rule is fixed and the workaround can go); aam_func's LayerNorm decomposes the
affine part under vmap over forward-mode AD and is exact.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import aam_func as af
from aam_func.layers.basic import LayerNorm


def _loss(norm_apply):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g)
    c = torch.randn(3, 4, dtype=torch.float64, generator=g)

    def loss(theta):
        w, b, shift = theta[:4], theta[4:8], theta[8:]
        return (torch.tanh(norm_apply({"weight": w, "bias": b}, x + shift)) * c).sum()

    return loss, torch.randn(12, dtype=torch.float64, generator=g)


def test_torch_fused_layer_norm_is_wrong_under_jacfwd_of_jacrev():
    loss, theta = _loss(lambda p, x: F.layer_norm(x, (4,), p["weight"], p["bias"]))
    err = (hessian(loss)(theta) - torch.autograd.functional.hessian(loss, theta)).abs().max()
    assert err > 1e-3  # the torch defect the workaround exists for; if this fails, drop the workaround


def test_aam_func_layer_norm_hessian_is_exact():
    loss, theta = _loss(LayerNorm(4).apply)
    torch.testing.assert_close(hessian(loss)(theta), torch.autograd.functional.hessian(loss, theta),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_transformer_hessian_is_symmetric_and_equals_reverse_over_reverse():
    cfg = af.ModelConfig(vocab_size=5, d_model=4, n_layers=1, n_heads=2, d_ff=4, max_seq_len=4, dropout=0.0,
                         attention_backend="math")
    model = af.Transformer(cfg)
    flat = {k: v.double() for k, v in af.tree.flatten(model.init(torch.Generator().manual_seed(0))).items()}
    names = list(flat)
    ids = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(1))
    sizes = [flat[n].numel() for n in names]

    def loss(theta):
        parts = dict(zip(names, (t.reshape(flat[n].shape) for n, t in zip(names, theta.split(sizes)))))
        return model.apply(af.tree.unflatten(parts), ids, labels=ids)["loss"]

    theta = torch.cat([flat[n].reshape(-1) for n in names])
    H = hessian(loss)(theta)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(loss, theta), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(H, H.T, rtol=1e-8, atol=1e-10)
