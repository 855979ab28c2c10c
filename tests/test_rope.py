"""The RoPE custom op: parity (composite layer, HF LLaMA), gradients, transforms, and the
rotation's properties from proofs/rope.md."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, jvp, vmap

from aam_func.ops.rope import reference, rope

LAYOUTS = ["half", "interleaved"]


def _x(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def complex_rope(x, pos, layout, base=10000.0):
    """An independent oracle: each channel pair as a complex number multiplied by e^{iθ}."""
    d = x.shape[-1]
    theta = pos.double()[..., None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if theta.dim() == 3:
        theta = theta[:, None]
    xd = x.double()
    re, im = (xd[..., : d // 2], xd[..., d // 2 :]) if layout == "half" else (xd[..., 0::2], xd[..., 1::2])
    z = torch.complex(re, im) * torch.polar(torch.ones_like(theta), theta)
    if layout == "half":
        return torch.cat([z.real, z.imag], -1)
    return torch.stack([z.real, z.imag], -1).flatten(-2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batched_pos", [False, True])
def test_equals_complex_rotation_and_reference(layout, batched_pos):
    x = _x(2, 3, 5, 8, dtype=torch.float32)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]) if batched_pos else torch.arange(3, 8)
    y = rope(x, pos, layout=layout)
    torch.testing.assert_close(y.double(), complex_rope(x, pos, layout), atol=1e-5, rtol=1e-5)
    assert torch.equal(y, reference(x, pos, layout=layout))


def test_bf16_equals_reference():
    x = _x(1, 2, 4, 8, dtype=torch.bfloat16)
    assert torch.equal(rope(x, torch.arange(4)), reference(x, torch.arange(4)))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_equals_hf_llama_apply_rotary_pos_emb(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, rope_scaling=scaling)
    q, k = _x(2, 4, 7, 16, dtype=torch.float32), _x(2, 4, 7, 16, dtype=torch.float32, seed=1)
    pid = torch.arange(3, 10)[None].expand(2, 7)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pid)
    qh, kh = apply_rotary_pos_emb(q, k, cos, sin)
    sc = None if scaling is None else ("linear", 4.0)
    torch.testing.assert_close(rope(q, pid, scaling=sc), qh, rtol=0, atol=1e-6)
    torch.testing.assert_close(rope(k, pid, scaling=sc), kh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scaling", [None, ("linear", 2.0), ("ntk", 4.0)])
def test_gradcheck_forward_ad_batched_and_gradgrad(layout, scaling):
    x = _x(2, 1, 3, 4).requires_grad_()
    pos = torch.tensor([[0, 1, 2], [4, 5, 6]])
    f = lambda x: rope(x, pos, layout=layout, scaling=scaling, base=100.0)  # noqa: E731
    assert gradcheck(f, (x,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(f, (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_grad_equals_reference(layout):
    xs = _x(3, 2, 2, 4, 6)
    v = _x(2, 2, 4, 6, seed=2)
    loss = lambda op: lambda x: (op(x, torch.arange(4), layout=layout) * v).sin().sum()  # noqa: E731
    torch.testing.assert_close(vmap(grad(loss(rope)))(xs), vmap(grad(loss(reference)))(xs))


def test_jvp_equals_reference():
    x, t = _x(1, 2, 3, 4), _x(1, 2, 3, 4, seed=3)
    a = jvp(lambda x: rope(x, torch.arange(3), layout="interleaved"), (x,), (t,))
    b = jvp(lambda x: reference(x, torch.arange(3), layout="interleaved"), (x,), (t,))
    torch.testing.assert_close(a, b)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4).map(lambda h: 2 * h))


@given(shape=shapes, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_rotation_is_orthogonal(shape, layout, seed):
    """‖R x‖ = ‖x‖ for every pair, hence for every head vector."""
    x = _x(*shape, seed=seed)
    pos = torch.randint(0, 1000, (shape[2],), generator=torch.Generator().manual_seed(seed))
    y = rope(x, pos, layout=layout)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@given(d=st.integers(1, 8).map(lambda h: 2 * h), m=st.integers(0, 500), n=st.integers(0, 500),
       shift=st.integers(-200, 200), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_inner_product_depends_only_on_offset(d, m, n, shift, layout, seed):
    q, k = _x(1, 1, 1, d, seed=seed), _x(1, 1, 1, d, seed=seed + 1)
    dot = lambda a, b: (rope(q, torch.tensor([a]), layout=layout) * rope(k, torch.tensor([b]), layout=layout)).sum()  # noqa: E731
    # Angles are float32 (as in HF): each is off by at most ~(position · 2^-24) rad.
    tol = 1e-4 * float(q.norm() * k.norm())
    torch.testing.assert_close(dot(m, n), dot(m + shift, n + shift), rtol=0, atol=tol)


@given(shape=shapes, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_backward_is_transpose_inverse_rotation(shape, layout, seed):
    """∂⟨R_θ x, v⟩/∂x = R_θᵀ v = R_{−θ} v, and R_{−θ} R_θ = I."""
    x, v = _x(*shape, seed=seed), _x(*shape, seed=seed + 1)
    pos = torch.arange(shape[2]) * 3 + 1
    gx = grad(lambda x: (rope(x, pos, layout=layout) * v).sum())(x)
    torch.testing.assert_close(gx, rope(v, -pos, layout=layout))
    torch.testing.assert_close(rope(rope(x, pos, layout=layout), -pos, layout=layout), x)


@given(half=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_layouts_are_a_fixed_channel_permutation(half, seed):
    """interleaved(x) = P⁻¹ half(P x) with P gathering even channels then odd ones."""
    d = 2 * half
    x = _x(1, 2, 3, d, seed=seed)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # interleaved -> half order
    inv = torch.argsort(perm)
    pos = torch.arange(3) + 5
    torch.testing.assert_close(rope(x, pos, layout="interleaved"), rope(x[..., perm], pos, layout="half")[..., inv])


def test_kv_cache_offset():
    x = _x(2, 2, 6, 8)
    full = rope(x, torch.arange(6))
    torch.testing.assert_close(rope(x[:, :, 4:], 4), full[:, :, 4:])
    torch.testing.assert_close(rope(x[:, :, 4:], torch.arange(4, 6)), full[:, :, 4:])


def test_scaling_definitions():
    x, pos, d = _x(1, 1, 5, 8), torch.arange(0, 20, 4), 8
    torch.testing.assert_close(rope(x, pos, scaling=("linear", 4.0)), rope(x, pos.double() / 4.0))
    torch.testing.assert_close(
        rope(x, pos, scaling={"type": "ntk", "factor": 3.0}), rope(x, pos, base=10000.0 * 3.0 ** (d / (d - 2)))
    )
    assert not torch.allclose(rope(x, pos, scaling=("ntk", 3.0)), rope(x, pos))


def test_angle_formula():
    x = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    x[..., 0] = 1.0  # pair (0, 2) in half layout, frequency 1
    x[..., 1] = 1.0  # pair (1, 3), frequency base^(-1/2)
    y = rope(x, torch.tensor([3]), base=100.0)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([math.cos(3), math.cos(0.3), math.sin(3), math.sin(0.3)], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, x_shape, pos, err",
    [
        ({}, (1, 1, 2, 5), torch.arange(2), "even head_dim"),
        ({"layout": "bogus"}, (1, 1, 2, 4), torch.arange(2), "layout"),
        ({}, (1, 1, 2, 4), torch.arange(3), "positions must be"),
        ({}, (2, 3, 4), torch.arange(3), "batch, heads, seq, head_dim"),
        ({"scaling": ("yarn", 2.0)}, (1, 1, 2, 4), torch.arange(2), "scaling kind"),
        ({"scaling": ("linear", 0.0)}, (1, 1, 2, 4), torch.arange(2), "factor"),
        ({"base": -1.0}, (1, 1, 2, 4), torch.arange(2), "base"),
        ({}, (1, 1, 2, 4), -1, "offset"),
    ],
)
def test_bad_input(kwargs, x_shape, pos, err):
    with pytest.raises(ValueError, match=err):
        rope(torch.zeros(x_shape), pos, **kwargs)
    with pytest.raises(TypeError, match="positions"):
        rope(torch.zeros(1, 1, 2, 4), [0, 1])
