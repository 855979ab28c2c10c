"""Behaviour mutation testing found unchecked outside attention and optim: per-example
gradients through an embedding with ``padding_idx`` (ghost route == vmap route, the padding row
gets nothing), ghost norms below 1 (no clipping), privacy after zero steps, the focal loss at
gamma = 1, and remat's saving of memory under a single ``grad``."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad

import aam_func as af
from aam_func import losses, per_sample, privacy

pytestmark = pytest.mark.usefixtures("one_thread")


def _embed_model(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"emb": scale * torch.randn(6, 3, generator=g), "w": scale * torch.randn(4, 3, generator=g)}

    def loss(p, ids):
        h = F.embedding(ids, p["emb"], padding_idx=0)
        return F.linear(h, p["w"]).pow(2).mean()

    ids = torch.tensor([[0, 1, 2, 0], [3, 0, 5, 4], [0, 0, 2, 1]])
    return loss, params, ids


def test_embedding_padding_idx_per_example_grads_ghost_equals_vmap():
    loss, params, ids = _embed_model(1.0)
    ghost = per_sample.grads(loss, params, ids, method="ghost")
    exact = per_sample.grads(loss, params, ids, method="vmap")
    for k in params:
        torch.testing.assert_close(ghost[k], exact[k], rtol=1e-5, atol=1e-6)
    assert (ghost["emb"][:, 0] == 0).all()  # the padding row receives no gradient
    assert ghost["emb"][:, 1:].abs().sum() > 0
    torch.testing.assert_close(per_sample.norms(loss, params, ids, method="ghost"),
                               per_sample.norms(loss, params, ids, method="vmap"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_norms_below_one_are_not_clipped(method):
    loss, params, ids = _embed_model(0.1)
    n = per_sample.norms(loss, params, ids, method=method)
    assert (n < 1).all() and (n > 0).all()
    g = per_sample.grads(loss, params, ids, method="vmap")
    want = torch.stack([torch.cat([g[k][i].flatten() for k in sorted(g)]).norm() for i in range(ids.shape[0])])
    torch.testing.assert_close(n, want, rtol=1e-5, atol=1e-7)
    total = per_sample.clipped_sum(loss, params, ids, max_norm=1.0, method=method).sum
    for k in params:
        torch.testing.assert_close(total[k], g[k].sum(0), rtol=1e-5, atol=1e-7)  # factors all 1
    assert torch.equal(per_sample.clip_factors(n, 1.0), torch.ones_like(n))


def test_privacy_after_zero_steps():
    assert privacy.epsilon(0, 0.01, 1.0, 1e-5) == 0.0
    assert privacy.rdp(0.01, 1.0, steps=0) == [0.0] * len(privacy.DEFAULT_ORDERS)
    assert privacy.noise_multiplier_for(1.0, 0, 0.01, 1e-5) == 0.0
    assert privacy.epsilon(1, 0.01, 1.0, 1e-5) > 0.0


def test_focal_loss_gamma_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 1, 2, 2])
    got = losses.focal_loss(logits, t, gamma=1.0, reduction="none")
    p_t = torch.softmax(logits, -1).gather(-1, t[:, None]).squeeze(-1)
    want = -(1 - p_t) * torch.log(p_t)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    gg, = torch.autograd.grad(got.sum(), logits)
    gw, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(gg.double(), gw, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.double(), -torch.log(p_t))  # gamma = 1 is not plain CE


def _saved_bytes(fn, x):
    """Bytes autograd saves for the backward during ``fn``'s forward, then one first-order grad.
    (torch.func.grad refuses saved-tensor hooks, so the count runs under torch.autograd.grad.)"""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x).sum()
    torch.autograd.grad(out, x)
    return total[0]


def test_remat_saves_memory_under_a_single_grad():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(64, 64, generator=g) / 8 for _ in range(4)]

    def deep(x):
        for m in w:
            x = torch.tanh(x @ m)
        return x

    x = torch.randn(32, 64, generator=g, requires_grad=True)
    plain, rematted = _saved_bytes(deep, x), _saved_bytes(af.remat(deep), x)
    assert rematted <= x.numel() * x.element_size() < plain / 4, (rematted, plain)  # only the input is kept
    torch.testing.assert_close(grad(lambda x: af.remat(deep)(x).sum())(x), grad(lambda x: deep(x).sum())(x))


def test_clip_factors_keep_every_clipped_norm_within_the_bound():
    C = 1.0
    n = torch.tensor([0.0, 0.5, C, C * (1 + 1e-7), 10 * C])
    w = per_sample.clip_factors(n, C)
    assert ((w > 0) & (w <= 1)).all()
    assert w[0] == 1 and w[1] == 1  # nothing to clip: a zero norm too
    assert (w * n <= C).all()  # ‖w_i g_i‖ ≤ C, just above the bound too
    torch.testing.assert_close(w[-1], torch.tensor(C / (10 * C + per_sample.CLIP_EPS)))
