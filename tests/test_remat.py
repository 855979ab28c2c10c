"""remat: same values and gradients as the function it wraps, under grad, vmap(grad), jvp and
eager autograd; keeps only its inputs; replays randomness."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, jvp, vmap

import aam_func as af
from aam_func.layers import dropout
from aam_func.ops.remat import remat


def _r(*shape, seed=0, dtype=torch.float64):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def block_setup():
    cfg = af.ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0, use_rope=True)
    model = af.Transformer(cfg)
    params = model.init(seed=0)["blocks"]["0"]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return model.block, params, x, torch.arange(5)


def _block_loss(block, wrap):
    def loss(params, x, pos):
        f = lambda p, x: block.apply(p, x, positions=pos)  # noqa: E731  (closure over a non-differentiated tensor)
        return wrap(f)(params, x).pow(2).mean()

    return loss


def _close_trees(a, b):
    fa, fb = af.tree.flatten(a), af.tree.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_block_grad_equal_under_torch_func_grad(block_setup):
    block, params, x, pos = block_setup
    g_remat = grad(_block_loss(block, remat), argnums=(0, 1))(params, x, pos)
    g_plain = grad(_block_loss(block, lambda f: f), argnums=(0, 1))(params, x, pos)
    _close_trees(g_remat[0], g_plain[0])
    torch.testing.assert_close(g_remat[1], g_plain[1])


def test_block_grad_equal_under_vmap_grad(block_setup):
    block, params, x, pos = block_setup
    per = lambda wrap: vmap(grad(lambda p, x: _block_loss(block, wrap)(p, x[None], pos)), in_dims=(None, 0))  # noqa: E731
    _close_trees(per(remat)(params, x), per(lambda f: f)(params, x))


def test_block_grad_equal_under_eager_backward(block_setup):
    block, params, x, pos = block_setup
    grads = []
    for wrap in (remat, lambda f: f):
        p = af.tree.map(lambda t: t.detach().clone().requires_grad_(), params)
        _block_loss(block, wrap)(p, x, pos).backward()
        grads.append(af.tree.map(lambda t: t.grad, p))
    _close_trees(*grads)


def test_block_grad_equal_under_bf16_autocast(block_setup):
    """The recomputation re-enters the forward's autocast state: under bf16 autocast the gradient
    is the bf16 function's (equal to no remat), not the float32 function's, both under
    torch.func.grad and in eager backward (which runs after the autocast region has closed)."""
    block, params, x, pos = block_setup

    def run(wrap):
        def loss(p, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _block_loss(block, wrap)(p, x, pos).float()
        return loss

    g_remat = grad(run(remat), argnums=(0, 1))(params, x)
    g_plain = grad(run(lambda f: f), argnums=(0, 1))(params, x)
    leaves = lambda g: [*af.tree.leaves(g[0]), g[1]]  # noqa: E731
    g32 = grad(_block_loss(block, lambda f: f), argnums=(0, 1))(params, x, pos)
    # remat = plain up to the order of the backward's float32 sums; bf16 vs float32 differs far more
    worst = lambda ga, gb: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(leaves(ga), leaves(gb)))  # noqa: E731
    assert worst(g_remat, g_plain) < 1e-4
    assert worst(g32, g_plain) > 1e-3
    eager = []
    for wrap in (remat, lambda f: f):
        p = af.tree.map(lambda t: t.detach().clone().requires_grad_(), params)
        run(wrap)(p, x).backward()
        eager.append(af.tree.map(lambda t: t.grad, p))
    for a, b in zip(af.tree.leaves(eager[0]), af.tree.leaves(eager[1])):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


def test_torch_utils_checkpoint_fails_under_grad_but_remat_works():
    """The reason remat exists (DESIGN.md): checkpoint refuses torch.func.grad."""
    from torch.utils.checkpoint import checkpoint

    f = lambda x: torch.sin(x).exp().sum()  # noqa: E731
    x = _r(4)
    with pytest.raises(Exception):
        grad(lambda x: checkpoint(f, x, use_reentrant=False))(x)
    torch.testing.assert_close(grad(remat(f))(x), grad(f)(x))


def test_pytrees_and_non_tensor_leaves_in_and_out():
    def f(tree, scale, n, ids):
        y = tree["a"]["w"] * scale + tree["b"][0].sum()
        return {"y": y.sin(), "ids": ids + n, "n": n, "pair": (y.cos(), None)}

    tree = {"a": {"w": _r(3)}, "b": [_r(2, seed=1)]}
    ids = torch.tensor([1, 2, 3])
    out_r, out_p = remat(f)(tree, 2.0, 5, ids), f(tree, 2.0, 5, ids)
    assert out_r["n"] == 5 and out_r["pair"][1] is None and out_r["ids"].dtype == torch.long
    torch.testing.assert_close(out_r["ids"], out_p["ids"])
    loss = lambda wrap: lambda t: (wrap(f)(t, 2.0, 5, ids)["y"] * wrap(f)(t, 2.0, 5, ids)["pair"][0]).sum()  # noqa: E731
    _close_trees(grad(loss(remat))(tree), grad(loss(lambda f: f))(tree))


def test_gradcheck_forward_ad_batched_and_gradgrad():
    f = remat(lambda x, w: torch.tanh(x @ w).pow(2))
    x, w = _r(2, 3).requires_grad_(), _r(3, 2, seed=1).requires_grad_()
    assert gradcheck(f, (x, w), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(f, (x, w))


@given(n=st.integers(1, 4), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_values_grads_jvp_and_hvp_equal_plain(n, d, seed):
    def f(x, w):
        return (torch.tanh(x @ w) * x.sum(-1, keepdim=True)).sum()

    x, w, v = _r(n, d, seed=seed), _r(d, d, seed=seed + 1), _r(n, d, seed=seed + 2)
    rf = remat(f)
    torch.testing.assert_close(rf(x, w), f(x, w))
    torch.testing.assert_close(grad(rf, argnums=(0, 1))(x, w), grad(f, argnums=(0, 1))(x, w))
    torch.testing.assert_close(jvp(lambda x: rf(x, w), (x,), (v,)), jvp(lambda x: f(x, w), (x,), (v,)))
    hvp = lambda g: jvp(lambda x: grad(g)(x, w), (x,), (v,))[1]  # noqa: E731
    torch.testing.assert_close(hvp(rf), hvp(f))
    torch.testing.assert_close(grad(lambda x: grad(rf)(x, w).pow(2).sum())(x), grad(lambda x: grad(f)(x, w).pow(2).sum())(x))


def test_keeps_only_inputs():
    """Saved-tensor hooks see exactly the inputs with remat, every intermediate without."""

    def f(x, w):
        h = torch.tanh(x @ w)
        return torch.sigmoid(h @ w).exp().sum()

    def n_saved(fn):
        ids = set()
        x, w = _r(3, 3).requires_grad_(), _r(3, 3, seed=1).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: ids.add(id(t)) or t, lambda t: t):
            fn(x, w)
        return len(ids)

    assert n_saved(remat(f)) == 2
    assert n_saved(f) > 4


def _dropout_fn(x, w, generator=None):
    return dropout(torch.tanh(x @ w), 0.5, train=True, generator=generator).sum(-1)


def test_global_rng_replayed_and_restored():
    x, w = _r(4, 6), _r(6, 6, seed=1)

    def run(wrap):
        torch.manual_seed(123)
        ww = w.clone().requires_grad_()
        y = wrap(_dropout_fn)(x, ww)
        after_forward = torch.get_rng_state()
        (y * torch.arange(4.0, dtype=y.dtype)).sum().backward()
        return y.detach(), ww.grad, after_forward, torch.get_rng_state()

    y_r, g_r, s_fwd, s_bwd = run(remat)
    y_p, g_p, _, _ = run(lambda f: f)
    torch.testing.assert_close(y_r, y_p)
    torch.testing.assert_close(g_r, g_p)  # the recomputation drew the same mask
    assert torch.equal(s_fwd, s_bwd)  # and left the global RNG where the forward did


def test_generator_argument_replayed_and_closure_generator_needs_listing():
    x, w = _r(4, 6), _r(6, 6, seed=1)
    want = grad(lambda w: _dropout_fn(x, w, torch.Generator().manual_seed(7)).sum())(w)
    g = torch.Generator().manual_seed(7)
    got = grad(lambda w: remat(_dropout_fn)(x, w, generator=g).sum())(w)
    torch.testing.assert_close(got, want)
    g = torch.Generator().manual_seed(7)
    listed = grad(lambda w: remat(lambda x, w: _dropout_fn(x, w, g), generators=[g])(x, w).sum())(w)
    torch.testing.assert_close(listed, want)
    g = torch.Generator().manual_seed(7)
    unlisted = grad(lambda w: remat(lambda x, w: _dropout_fn(x, w, g))(x, w).sum())(w)
    assert not torch.allclose(unlisted, want)  # the documented rule: unlisted closure generators are not replayed


def test_bad_input():
    with pytest.raises(TypeError, match="callable"):
        remat(3)
    with pytest.raises(TypeError, match="Generator"):
        remat(lambda x: x, generators=[0])
