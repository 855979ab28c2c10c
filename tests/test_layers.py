"""Every layer: float64 gradcheck wrt params and inputs; semantics against torch.nn."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import vmap

from aam_func import layers, tree

G = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


def _gradcheck_layer(spec, x, **kw):
    params = tree.cast(spec.init(G()), torch.float64)
    names = tree.names(params)
    leaves = [p.clone().requires_grad_(True) for p in tree.leaves(params)]

    def f(x, *leaves):
        return spec.apply(tree.unflatten(dict(zip(names, leaves))), x, **kw)

    assert gradcheck(f, (x.double().requires_grad_(True), *leaves), check_forward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    _gradcheck_layer(layers.Linear(3, 2, bias=bias), torch.randn(2, 3))
    spec = layers.Linear(3, 2)
    p = spec.init(G(1))
    ref = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        ref.weight.copy_(p["weight"]), ref.bias.copy_(p["bias"])
    x = torch.randn(4, 3)
    assert torch.allclose(spec.apply(p, x), ref(x))


def test_linear_default_init_matches_nn_linear():
    spec = layers.Linear(5, 4)
    torch.manual_seed(7)
    ref = torch.nn.Linear(5, 4)
    g = torch.Generator().manual_seed(7)
    p = spec.init(g)
    assert torch.equal(p["weight"], ref.weight.detach()) and torch.equal(p["bias"], ref.bias.detach())


def test_embedding_gradcheck():
    spec = layers.Embedding(5, 3)
    p = tree.cast(spec.init(G()), torch.float64)
    ids = torch.tensor([[0, 4, 4], [1, 2, 3]])
    w = p["weight"].clone().requires_grad_(True)
    assert gradcheck(lambda w: spec.apply({"weight": w}, ids), (w,), check_forward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(bias):
    _gradcheck_layer(layers.LayerNorm(4, bias=bias), torch.randn(2, 4))
    ref = torch.nn.LayerNorm(4, bias=bias)
    x = torch.randn(3, 4)
    assert torch.allclose(layers.LayerNorm(4, bias=bias).apply(layers.LayerNorm(4, bias=bias).init(), x), ref(x), atol=1e-6)


def test_rmsnorm():
    _gradcheck_layer(layers.RMSNorm(4, eps=1e-6), torch.randn(2, 4))
    x = torch.randn(3, 4)
    ref = torch.nn.RMSNorm(4, eps=1e-6)
    assert torch.allclose(layers.RMSNorm(4, 1e-6).apply({"weight": torch.ones(4)}, x), ref(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "relu", "silu", "swiglu"])
def test_mlp(kind):
    x = torch.randn(2, 3, 4)
    if kind == "relu":
        x = x + 0.05 * torch.sign(x)  # keep away from the kink for finite differences
    _gradcheck_layer(layers.MLP(4, 6, kind=kind), x)


def test_mlp_bad_kind():
    with pytest.raises(ValueError, match="mlp kind"):
        layers.MLP(4, 6, kind="tanh")


def test_positions():
    _gradcheck_layer(layers.LearnablePositions(4, 8), torch.randn(2, 5, 4), positions=torch.arange(5))
    sin = layers.SinusoidalPositions(6, 8)
    x = torch.zeros(1, 3, 6)
    out = sin.apply({}, x, torch.arange(3))
    pos, i = 2, 1
    assert torch.allclose(out[0, pos, 2 * i], torch.tensor(pos / 10000 ** (2 * i / 6)).sin())
    assert torch.allclose(out[0, pos, 2 * i + 1], torch.tensor(pos / 10000 ** (2 * i / 6)).cos())
    init_sin = layers.LearnablePositions(6, 8, weight_init="sinusoidal").init(G())
    assert torch.allclose(init_sin["weight"][:3], out[0])


@pytest.mark.parametrize("attention_type", ["standard", "relative", "local", "sparse"])
@pytest.mark.parametrize("kv", [2, 1])
def test_attention_layer(attention_type, kv):
    spec = layers.SelfAttention(
        d_model=4, n_heads=2, n_kv_heads=kv, attention_type=attention_type, max_relative_position=2, backend="math"
    )
    _gradcheck_layer(spec, torch.randn(1, 5, 4), positions=torch.arange(5))


def test_attention_layer_rope_gradcheck():
    spec = layers.SelfAttention(d_model=8, n_heads=2, rope=True, backend="math")
    _gradcheck_layer(spec, torch.randn(1, 4, 8), positions=torch.arange(4))


def test_block_gradcheck():
    attn = layers.SelfAttention(d_model=4, n_heads=2, backend="math")
    spec = layers.Block(attn, layers.MLP(4, 8, kind="gelu"))
    _gradcheck_layer(spec, torch.randn(1, 4, 4), positions=torch.arange(4))


@pytest.mark.parametrize("attention_type", ["standard", "relative", "local", "sparse"])
@pytest.mark.parametrize("layer", ["attention", "block"])
def test_decode_equals_apply_and_each_returns_one_type(attention_type, layer):
    """SelfAttention/Block: ``apply`` returns a tensor; ``decode`` over a growing (concatenated)
    cache and over static buffers returns ``(out, (k, v))`` whose out equals apply's at the new
    positions, and whose cache holds the keys of every position so far."""
    attn = layers.SelfAttention(d_model=8, n_heads=2, n_kv_heads=1, attention_type=attention_type,
                                max_relative_position=2, rope=True, backend="math")
    spec = attn if layer == "attention" else layers.Block(attn, layers.MLP(8, 16, kind="gelu"))
    p = spec.init(G(3))
    B, T, L = 2, 6, 9
    x = torch.randn(B, T, 8, generator=G(4))
    want = spec.apply(p, x, positions=torch.arange(T))
    assert isinstance(want, torch.Tensor) and want.shape == (B, T, 8)
    grown, bufs = (torch.zeros(B, 1, 0, 4),) * 2, (torch.zeros(B, 1, L, 4), torch.zeros(B, 1, L, 4))
    got_dynamic, got_static = [], []
    for start, stop in [(0, 3), (3, 4), (4, 6)]:
        kw = dict(positions=torch.arange(start, stop))
        out, grown = spec.decode(p, x[:, start:stop], grown, **kw)
        got_dynamic.append(out)
        out, bufs = spec.decode(p, x[:, start:stop], bufs, cache_position=torch.tensor(start), **kw)
        got_static.append(out)
        assert grown[0].shape == (B, 1, stop, 4) and bufs[0].shape == (B, 1, L, 4)
    torch.testing.assert_close(torch.cat(got_dynamic, 1), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_static, 1), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bufs[0][:, :, :T], grown[0])
    torch.testing.assert_close(bufs[1][:, :, :T], grown[1])
    assert bufs[0][:, :, T:].abs().sum() == 0


def test_dropout_generator_and_vmap():
    x = torch.ones(4, 100)
    a = layers.dropout(x, 0.5, train=True, generator=G(1))
    b = layers.dropout(x, 0.5, train=True, generator=G(1))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(layers.dropout(x, 0.5, train=False), x)
    torch.manual_seed(0)
    out = vmap(lambda r: layers.dropout(r, 0.5, train=True), randomness="different")(x)
    assert not torch.equal(out[0], out[1])
    same = vmap(lambda r: layers.dropout(r, 0.5, train=True), randomness="same")(x)
    assert torch.equal(same[0], same[1])
    g = G(2)
    out_g = vmap(lambda r: layers.dropout(r, 0.5, train=True, generator=g), randomness="different")(x)
    assert not torch.equal(out_g[0], out_g[1])
    with pytest.raises(ValueError, match="dropout probability"):
        layers.dropout(x, 1.0, train=True)
