"""The fused LM-head cross-entropy: parity with F.linear + F.cross_entropy, gradients under every
transform, the documented values for degenerate batches, errors, and the model's loss."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, jvp, vmap

import aam_func as af
from aam_func.losses import lm_loss, shift_labels
from aam_func.ops.cross_entropy import linear_cross_entropy as lce
from aam_func.ops.cross_entropy import reference


def _r(*shape, seed=0, dtype=torch.float64):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _targets(n, v, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < ignore_frac, torch.full_like(t, -100), t)


def _torch_ce(h, w, t, bias=None, reduction="mean", **kw):
    return F.cross_entropy(F.linear(h, w, bias), t, reduction=reduction, **kw)


@given(
    n=st.integers(1, 12), v=st.integers(2, 9), d=st.integers(1, 5), chunk=st.one_of(st.none(), st.integers(1, 7)),
    eps=st.sampled_from([0.0, 0.1, 0.5]), reduction=st.sampled_from(["mean", "sum", "none"]),
    use_bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_matches_torch_values_and_grads(n, v, d, chunk, eps, reduction, use_bias, seed):
    h, w = _r(n, d, seed=seed).requires_grad_(), _r(v, d, seed=seed + 1).requires_grad_()
    b = _r(v, seed=seed + 2).requires_grad_() if use_bias else None
    t = _targets(n, v, seed)
    t[0] = 0  # at least one real target: torch's "mean" is NaN otherwise
    ours = lce(h, w, t, bias=b, label_smoothing=eps, reduction=reduction, chunk_size=chunk)
    want = _torch_ce(h, w, t, bias=b, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(ours, want)
    inputs = [h, w] + ([b] if use_bias else [])
    cot = _r(*ours.shape, seed=seed + 3)
    torch.testing.assert_close(torch.autograd.grad(ours, inputs, cot), torch.autograd.grad(want, inputs, cot))


def test_z_loss_matches_reference_and_definition():
    h, w, t = _r(6, 3), _r(5, 3, seed=1), _targets(6, 5)
    per = lce(h, w, t, z_loss=0.3, reduction="none")
    z = F.linear(h, w)
    want = F.cross_entropy(z, t, reduction="none") + 0.3 * torch.logsumexp(z, -1) ** 2 * (t != -100)
    torch.testing.assert_close(per, want)


CASES = [
    dict(chunk_size=2),
    dict(chunk_size=3, label_smoothing=0.1, z_loss=0.01, reduction="sum"),
    dict(chunk_size=4, reduction="none", label_smoothing=0.2),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_gradcheck_forward_ad_batched_gradgrad(kw, use_bias):
    h, w = _r(2, 3, 3).requires_grad_(), _r(5, 3, seed=1).requires_grad_()
    b = _r(5, seed=2).requires_grad_()
    t = torch.tensor([[0, 4, -100], [2, 3, 1]])
    f = (lambda h, w, b: lce(h, w, t, bias=b, **kw)) if use_bias else (lambda h, w: lce(h, w, t, **kw))
    args = (h, w, b) if use_bias else (h, w)
    assert gradcheck(f, args, check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("kw", CASES)
def test_transforms_equal_reference(kw):
    """torch.func.grad (precomputed gradient), vmap(grad) (recomputed), grad(grad) and jvp(grad)
    (differentiable recomputation) all agree with the composite reference."""
    h, w, t = _r(5, 3), _r(6, 3, seed=1), _targets(5, 6, seed=3)
    red = (lambda x: x.pow(2).sum()) if kw.get("reduction") == "none" else (lambda x: x)
    g_op = grad(lambda h, w: red(lce(h, w, t, **kw)), argnums=(0, 1))
    g_ref = grad(lambda h, w: red(reference(h, w, t, **kw)), argnums=(0, 1))
    torch.testing.assert_close(g_op(h, w), g_ref(h, w))
    H, W = torch.stack([h, 1.1 * h]), torch.stack([w, 0.9 * w])
    torch.testing.assert_close(vmap(g_op)(H, W), vmap(g_ref)(H, W))
    hess = lambda g: grad(lambda h: g(h, w)[1].pow(2).sum())(h)  # noqa: E731
    torch.testing.assert_close(hess(g_op), hess(g_ref))
    v = _r(5, 3, seed=9)
    torch.testing.assert_close(
        jvp(lambda h: g_op(h, w)[0], (h,), (v,)), jvp(lambda h: g_ref(h, w)[0], (h,), (v,))
    )


def test_eager_backward_equals_torch_func_grad():
    h, w, t = _r(7, 4), _r(9, 4, seed=1), _targets(7, 9, seed=2)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (2.5 * lce(hh, ww, t, chunk_size=3)).backward()
    gh, gw = grad(lambda h, w: 2.5 * lce(h, w, t, chunk_size=3), argnums=(0, 1))(h, w)
    torch.testing.assert_close((hh.grad, ww.grad), (gh, gw))


def test_per_sample_grads_match_reference():
    """vmap(grad) over samples, each its own sequence of tokens (the per_sample use)."""
    h, t, w = _r(3, 4, 2), torch.tensor([[1, 2, -100, 0], [3, 3, 3, 3], [-100] * 4]), _r(5, 2, seed=1)
    per = lambda op: vmap(grad(lambda w, h, t: op(h, w, t, chunk_size=2), argnums=0), in_dims=(None, 0, 0))  # noqa: E731
    torch.testing.assert_close(per(lce)(w, h, t), per(reference)(w, h, t))
    assert torch.count_nonzero(per(lce)(w, h, t)[2]) == 0  # all-ignored sample: zero gradient


def test_bf16_accumulates_in_float32():
    h, w, t = _r(16, 8, dtype=torch.float32), _r(50, 8, seed=1, dtype=torch.float32), _targets(16, 50)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = lce(hb, wb, t, chunk_size=5)
    assert loss.dtype == torch.float32
    want = _torch_ce(hb.float(), wb.float(), t)
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    hf, wf = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    _torch_ce(hf, wf, t).backward()
    torch.testing.assert_close(wb.grad.float(), wf.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("v, n, chunk", [(50257, 400, None), (1000, 10000, 5000), (1000, 10000, 4000)])
def test_bf16_gradient_groups_hold_whole_chunks(v, n, chunk):
    """Low precision keeps each chunk's gradient rows in a buffer of about _GROUP_ELEMENTS; when
    that buffer was not a whole number of chunks, a chunk straddled its end and the op crashed
    (GPT-2's vocabulary: 41-token chunks, a 166-row buffer, any batch of more than 166 tokens)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, 4, generator=g), torch.randn(v, 4, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = lce(hb, wb, t, chunk_size=chunk)
    loss.backward()
    hf, wf = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    want = _torch_ce(hf, wf, t)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wb.grad.float(), wf.grad, rtol=5e-2, atol=5e-2 * wf.grad.abs().max().item())
    torch.testing.assert_close(hb.grad.float(), hf.grad, rtol=5e-2, atol=5e-2 * hf.grad.abs().max().item())


def test_autocast_fused_equals_autocast_composite():
    """Under CPU bf16 autocast the fused op equals autocast's own F.linear + float32
    cross-entropy (the logits rounded to bf16 once), in value and in float32 gradients of float32
    inputs, under torch.func.grad and eager backward; and it is the bf16 function, not the fp32 one."""
    h, w, t = _r(64, 16, dtype=torch.float32), _r(300, 16, seed=1, dtype=torch.float32), _targets(64, 300)

    def fused(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lce(h, w, t, chunk_size=16)

    def composite(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_loss(F.linear(h, w), t)

    torch.testing.assert_close(fused(h, w), composite(h, w), rtol=1e-6, atol=1e-6)
    assert (fused(h, w) - lce(h, w, t)).abs() > 1e-4  # the bf16 function, not the float32 one
    gf, gc = grad(fused, argnums=(0, 1))(h, w), grad(composite, argnums=(0, 1))(h, w)
    for a, b in zip(gf, gc):
        assert a.dtype == torch.float32
        # bf16-level agreement: chunked bf16 partial sums of the weight gradient vs one bf16 matmul
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3 * b.abs().max().item())
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused(hh, ww).backward()
    torch.testing.assert_close(hh.grad, gf[0])
    torch.testing.assert_close(ww.grad, gf[1])


def test_function_mode_sees_the_head_linear():
    """Under a TorchFunctionMode the op runs the composite, so the mode sees F.linear(h, W) and
    whatever it adds there is differentiated (as LoRA's factored path and ghost clipping need)."""
    from torch.overrides import TorchFunctionMode

    h, w, t = _r(6, 4), _r(9, 4, seed=1), _targets(6, 9)
    delta = _r(6, 9, seed=2)

    class AddToHead(TorchFunctionMode):
        seen = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.linear and args[1] is w:
                AddToHead.seen += 1
                out = out + delta
            return out

    with AddToHead():
        loss = lce(h, w, t)
        g = grad(lambda h: lce(h, w, t))(h)
    assert AddToHead.seen == 2
    want = lm_loss(F.linear(h, w) + delta, t)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, grad(lambda h: lm_loss(F.linear(h, w) + delta, t))(h))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_batches(reduction):
    """Documented: every target ignored -> 0 (zero gradient) for mean and sum, zeros for none."""
    h, w = _r(4, 3).requires_grad_(), _r(5, 3, seed=1).requires_grad_()
    loss = lce(h, w, torch.full((4,), -100), reduction=reduction)
    assert torch.count_nonzero(loss) == 0 and not loss.isnan().any()
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # consistent with the model's lm_loss for "mean"
    if reduction == "mean":
        assert lm_loss(F.linear(h, w), torch.full((4,), -100)).item() == loss.item() == 0.0
    he = _r(0, 3).requires_grad_()
    empty = lce(he, w, torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert empty.shape == ((0,) if reduction == "none" else ())
    assert torch.count_nonzero(empty) == 0
    assert torch.count_nonzero(torch.autograd.grad(empty.sum(), w)[0]) == 0


@pytest.mark.parametrize(
    "make, err, exc",
    [
        (lambda h, w, t: lce(h, w, torch.tensor([0, 5, 1])), r"targets contains 5, outside \[0, vocab=5\)", ValueError),
        (lambda h, w, t: lce(h, w, torch.tensor([0, -3, 1])), "targets contains -3", ValueError),
        (lambda h, w, t: lce(h[:, :2], w, t), "disagree on d", ValueError),
        (lambda h, w, t: lce(h, w, t, label_smoothing=1.0), "label_smoothing", ValueError),
        (lambda h, w, t: lce(h, w, t, label_smoothing=-0.1), "label_smoothing", ValueError),
        (lambda h, w, t: lce(h, w, t, z_loss=-1.0), "z_loss", ValueError),
        (lambda h, w, t: lce(h, w, t, reduction="avg"), "reduction", ValueError),
        (lambda h, w, t: lce(h, w, t, chunk_size=0), "chunk_size", ValueError),
        (lambda h, w, t: lce(h, w, t[:2]), "targets must have shape", ValueError),
        (lambda h, w, t: lce(h, w, t, bias=torch.zeros(4, dtype=torch.float64)), "bias", ValueError),
        (lambda h, w, t: lce(h, w.float(), t), "dtypes differ", TypeError),
        (lambda h, w, t: lce(h, w, t.double()), "integer", TypeError),
    ],
)
def test_bad_input(make, err, exc):
    h, w, t = _r(3, 3), _r(5, 3, seed=1), torch.tensor([0, 4, -100])
    with pytest.raises(exc, match=err):
        make(h, w, t)
    # a custom ignore_index is honoured, and -100 is then out of range
    torch.testing.assert_close(lce(h, w, torch.tensor([0, 4, 7]), ignore_index=7), _torch_ce(h, w, torch.tensor([0, 4, 7]), ignore_index=7))


# ----------------------------------------------------------------------------- the model's loss
def _hand_forward(model, params, ids):
    """The Transformer's forward up to the final norm, built from its pieces."""
    x = model.embed(params, ids)
    positions = torch.arange(ids.shape[1])
    if model.positions is not None:
        x = model.positions.apply(params.get("pos", {}), x, positions)
    for i in range(model.cfg.n_layers):
        x = model.block.apply(params["blocks"][str(i)], x, positions=positions)
    return model.final_norm.apply(params["ln_f"], x)


@pytest.mark.parametrize("smoothing", [pytest.param(0.0, marks=pytest.mark.slow), 0.1])
def test_transformer_loss_fused_equals_unfused(smoothing):
    cfg = af.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0,
                         label_smoothing=smoothing, use_rope=True)
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False

    def unfused(p):
        return model.apply(p, ids, labels=ids, attention_mask=mask)["loss"]

    def fused(p):
        # padded positions do not change real positions' hidden states (keys are masked), and
        # their targets are ignored, so the unmasked hand forward gives the same loss.
        hidden = _hand_forward(model, p, ids)
        targets = shift_labels(ids, mask)
        return lce(hidden, p["embed"]["weight"], targets, label_smoothing=smoothing, chunk_size=7)

    def model_fused(p):  # the model's own fused path (taken when logits are not requested)
        return model.apply(p, ids, labels=ids, attention_mask=mask, return_logits=False)["loss"]

    hidden = _hand_forward(model, params, ids)
    torch.testing.assert_close(F.linear(hidden, params["embed"]["weight"]), model.apply(params, ids)["logits"])
    g_unfused = af.tree.flatten(grad(unfused)(params))
    for fn in (fused, model_fused):
        assert abs(fn(params).item() - unfused(params).item()) <= 1e-6
        g = af.tree.flatten(grad(fn)(params))
        for k in g_unfused:
            torch.testing.assert_close(g[k], g_unfused[k], rtol=1e-4, atol=1e-6)


def test_retained_graph_second_backward_is_still_right():
    """A second backward through a retained graph (new upstream gradient) is right too."""
    h, w, t = _r(6, 3).requires_grad_(), _r(5, 3, seed=1).requires_grad_(), _targets(6, 5)
    loss = lce(h, w, t, chunk_size=4)
    g1 = torch.autograd.grad(3.0 * loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(0.5 * loss, (h, w))
    want = torch.autograd.grad(reference(h, w, t), (h, w))
    torch.testing.assert_close(g1, tuple(3.0 * x for x in want))
    torch.testing.assert_close(g2, tuple(0.5 * x for x in want))
