"""Behaviour that mutation testing found unchecked in RoPE, the fused cross-entropy, remat and the
losses: PyTorch's ignore label, immutable per-call options, the losses on (batch, seq, classes)
logits, a single valid target, document masking and target counts, tiny and duplicate
embeddings, exceptions and CUDA state around remat's recomputation, NTK scaling at head_dim 2,
and bitwise parity of the float32 angle tables."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from aam_func import losses
from aam_func.ops import cross_entropy as ce
from aam_func.ops import remat as remat_mod
from aam_func.ops import rope as rope_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def _r(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- cross-entropy
def test_ignore_index_is_pytorchs_and_is_the_default():
    assert ce.IGNORE_INDEX == inspect.signature(F.cross_entropy).parameters["ignore_index"].default == -100
    for fn in (ce.linear_cross_entropy, ce.reference, losses.focal_loss, losses.label_smoothing_loss, losses.lm_loss):
        assert inspect.signature(fn).parameters["ignore_index"].default == ce.IGNORE_INDEX
    # check_class_ids' default accepts exactly that label and nothing else outside the classes
    ce.check_class_ids("labels", torch.tensor([0, -100, 2]), 3)
    with pytest.raises(ValueError, match="contains -101"):
        ce.check_class_ids("labels", torch.tensor([0, -101, 2]), 3)
    # -100 labels contribute nothing, exactly as in F.cross_entropy's defaults
    h, w = _r(5, 3), _r(4, 3, seed=1)
    t = torch.tensor([1, -100, 3, -100, 0])
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(ce.linear_cross_entropy(h, w, t, reduction=reduction),
                                   F.cross_entropy(F.linear(h, w), t, reduction=reduction))


def test_call_options_are_immutable_and_hashable():
    o = ce._Options(eps=0.0, zl=0.0, reduction="mean", chunk=4, precompute=False, eager=True,
                    higher_order=False, low=None)
    assert hash(o) == hash(dataclasses.replace(o)) and o == dataclasses.replace(o)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.chunk = 8


# ----------------------------------------------------------------------------- losses
def _seq_inputs(seed=0, B=2, T=3, C=5):
    """(B, T, C) logits with T != C and B != T: a reduction over the wrong axis changes the result."""
    z = _r(B, T, C, seed=seed).requires_grad_()
    t = torch.tensor([[1, 4, -100], [0, 2, 3]])[:B, :T]
    return z, t


def test_class_losses_on_sequence_logits_equal_torch():
    z, t = _seq_inputs()
    flat_z, flat_t = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    for eps in (0.0, 0.2):
        want = F.cross_entropy(flat_z, flat_t, label_smoothing=eps, reduction="none").reshape(t.shape)
        torch.testing.assert_close(losses.label_smoothing_loss(z, t, eps, reduction="none"), want)
        torch.testing.assert_close(losses.focal_loss(z, t, gamma=0.0, reduction="none", label_smoothing=eps), want)
        torch.testing.assert_close(losses.lm_loss(z, t, label_smoothing=eps),
                                   F.cross_entropy(flat_z, flat_t, label_smoothing=eps))
    alpha = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.25], dtype=torch.float64)  # per class: (C,), C != T
    want = F.cross_entropy(flat_z, flat_t, reduction="none").reshape(t.shape) * alpha[t.clamp(min=0)] * (t != -100)
    torch.testing.assert_close(losses.focal_loss(z, t, alpha=alpha, gamma=0.0, reduction="none"), want)


def test_focal_scalar_alpha_scales_the_loss():
    z, t = _seq_inputs()
    base = losses.focal_loss(z, t, gamma=1.5, reduction="none")
    for a in (2.0, 0.5):
        torch.testing.assert_close(losses.focal_loss(z, t, alpha=a, gamma=1.5, reduction="none"), a * base)
    # through lm_loss too: alpha alone (gamma 0) and gamma 1 alone are focal losses
    torch.testing.assert_close(losses.lm_loss(z, t, focal_alpha=2.0), 2.0 * losses.lm_loss(z, t).double())
    torch.testing.assert_close(losses.lm_loss(z, t, focal_gamma=1.0), losses.focal_loss(z, t, gamma=1.0))
    assert losses.lm_loss(z, t, focal_gamma=1.0) < losses.lm_loss(z, t)


def test_mean_over_a_single_valid_target_is_that_targets_loss():
    z = _r(3, 4)
    t = torch.tensor([-100, 2, -100])
    one = F.cross_entropy(z[1:2], t[1:2])
    torch.testing.assert_close(losses.lm_loss(z, t), one)
    torch.testing.assert_close(losses.label_smoothing_loss(z, t, 0.0), one)
    torch.testing.assert_close(losses.focal_loss(z, t, gamma=0.0), one)


def test_losses_accumulate_in_float32_and_keep_float64():
    z, t = _r(4, 6, scale=3.0), torch.tensor([0, 5, 2, -100])
    low = z.to(torch.bfloat16)
    for fn in (lambda x: losses.focal_loss(x, t, gamma=2.0), lambda x: losses.label_smoothing_loss(x, t, 0.1),
               lambda x: losses.lm_loss(x, t)):
        out = fn(low)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(low.float()), rtol=0, atol=0)  # upcast first, then the same math
        assert fn(z).dtype == torch.float64
    e = _r(5, 3)
    assert losses.contrastive_loss(e.to(torch.bfloat16), torch.tensor([0, 0, 1, 1, 2])).dtype == torch.float32
    torch.testing.assert_close(losses.contrastive_loss(e.float(), torch.tensor([0, 0, 1, 1, 2])),
                               losses.contrastive_loss(e, torch.tensor([0, 0, 1, 1, 2])).float())


def test_shift_mask_and_count_targets():
    labels = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    docs = torch.tensor([[0, 0, 1, 1, 2], [3, 3, 3, 3, 3]])
    masked = losses.mask_document_starts(labels, docs)
    assert masked.tolist() == [[5, 6, -100, 8, -100], [1, 2, 3, 4, 5]]  # first token of doc 1 and 2
    assert losses.mask_document_starts(labels, docs, ignore_index=-1).tolist() == [[5, 6, -1, 8, -1], [1, 2, 3, 4, 5]]
    assert losses.shift_labels(masked).tolist() == [[6, -100, 8, -100, -100], [2, 3, 4, 5, -100]]
    assert losses.shift_labels(labels).shape == labels.shape
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert losses.count_targets(labels).item() == 8  # the last position of each row predicts nothing
    assert losses.count_targets(labels, mask).item() == 2 + 4
    n = losses.count_targets(masked)
    assert n.dtype == torch.int64 and n.dim() == 0 and n.item() == 6
    assert n.item() == (losses.shift_labels(masked) != -100).sum().item()


def test_margin_contrastive_duplicate_points_and_a_single_pair():
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1])
    loss = losses.contrastive_loss(e, y, margin=1.5, kind="margin")
    # pairs (0,1) and (0,2) differ at distance 0: margin² each; (1,2) same at distance 0: 0
    torch.testing.assert_close(loss, torch.tensor(2 * 1.5**2 / 3, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, e)
    assert torch.isfinite(g).all()
    pair = torch.tensor([[0.0, 0.0], [0.3, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(losses.contrastive_loss(pair, torch.tensor([0, 1]), margin=1.0, kind="margin"),
                               torch.tensor(0.25, dtype=torch.float64))  # one pair: (1 − 0.5)², not halved
    torch.testing.assert_close(losses.contrastive_loss(pair, torch.tensor([2, 2]), kind="margin"),
                               torch.tensor(0.25, dtype=torch.float64))  # same class: d² = 0.25


def _supcon(e, y, tau):
    """SupCon L_out by loops: mean over anchors with positives of −mean_p log softmax_{a≠i}."""
    u = e / e.norm(dim=-1, keepdim=True)
    total, anchors = 0.0, 0
    for i in range(len(y)):
        others = [a for a in range(len(y)) if a != i]
        pos = [p for p in others if y[p] == y[i]]
        if not pos:
            continue
        logits = torch.stack([u[i] @ u[a] / tau for a in others])
        lse = torch.logsumexp(logits, 0)
        total += -sum((u[i] @ u[p] / tau - lse).item() for p in pos) / len(pos)
        anchors += 1
    return total / max(anchors, 1)


def test_supcon_with_and_without_positives_and_one_positive_each():
    e = _r(6, 3, seed=3)
    for y in ([0, 0, 1, 2, 3, 3], [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 1]):
        y = torch.tensor(y)
        got = losses.contrastive_loss(e, y, temperature=0.5)
        assert abs(got.item() - _supcon(e, y, 0.5)) < 1e-10, y


def test_supcon_is_scale_invariant_down_to_tiny_norms():
    e, y = _r(4, 3, seed=5), torch.tensor([0, 0, 1, 1])
    norms = e.norm(dim=-1, keepdim=True)
    tiny = e / norms * 1.5e-12  # above F.normalize's eps of 1e-12: still a direction
    torch.testing.assert_close(losses.contrastive_loss(tiny, y), losses.contrastive_loss(e, y))


def test_triplet_single_and_empty():
    a, p, n = _r(1, 3), _r(1, 3, seed=1), _r(1, 3, seed=2)
    torch.testing.assert_close(losses.triplet_loss(a, p, n, margin=2.0),
                               F.triplet_margin_loss(a, p, n, margin=2.0))
    for reduction in ("mean", "sum"):
        out = losses.triplet_loss(*(torch.zeros(0, 3),) * 3, reduction=reduction)
        assert out.item() == 0.0 and not torch.isnan(out)


# ----------------------------------------------------------------------------- rope
@pytest.mark.parametrize("scaling", [5, "ab", ("linear", 2.0, 1.0), ("linear",)])
def test_rope_scaling_of_the_wrong_form_is_refused(scaling):
    with pytest.raises(ValueError, match="rope scaling must be"):
        rope_mod.rope(torch.zeros(1, 1, 2, 4), torch.arange(2), scaling=scaling)


def test_rope_scaling_as_a_list_pair():
    x, pos = _r(1, 2, 3, 4), torch.arange(3)
    torch.testing.assert_close(rope_mod.rope(x, pos, scaling=["linear", 2.0]), rope_mod.rope(x, pos, scaling=("linear", 2.0)))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_ntk_scaling_at_head_dim_two_leaves_the_base(layout):
    # d/(d−2) has no value at d = 2; the one frequency is base^0 = 1 whatever the base
    x, pos = _r(2, 1, 3, 2), torch.tensor([0, 5, 9])
    plain = rope_mod.rope(x, pos, layout=layout)
    for fn in (rope_mod.rope, rope_mod.reference):
        torch.testing.assert_close(fn(x, pos, layout=layout, scaling=("ntk", 4.0)), plain, rtol=0, atol=0)


def _hf_style(x, pos, base=10000.0):
    """HF LLaMA's float32 recipe: inv_freq and angles in float32, cos/sin cast, rotate_half."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + rot * sin


def test_rope_float32_angles_are_float32_and_float64_angles_float64():
    pos = torch.arange(4090, 4096)  # large angles: a table in the other precision differs visibly
    x32 = _r(1, 2, 6, 16, dtype=torch.float32)
    want = _hf_style(x32, pos)
    assert torch.equal(rope_mod.rope(x32, pos), want)
    assert torch.equal(rope_mod.reference(x32, pos), want)
    x64 = x32.double()
    theta = pos.double()[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    theta = torch.cat([theta, theta], -1)
    rot = torch.cat([-x64[..., 8:], x64[..., :8]], -1)
    exact = x64 * theta.cos() + rot * theta.sin()
    for fn in (rope_mod.rope, rope_mod.reference):
        torch.testing.assert_close(fn(x64, pos), exact, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- remat
class _Boom(Exception):
    pass


def test_remat_an_error_in_the_recomputation_propagates_and_restores_the_rng():
    calls = [0]

    def f(x):
        calls[0] += 1
        if calls[0] > 1:  # the recomputation in the backward
            torch.rand(3)  # moves the replayed RNG before failing
            raise _Boom("recomputation failed")
        return torch.sin(x).sum()

    x = _r(3).requires_grad_()
    y = remat_mod.remat(f)(x)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with pytest.raises(_Boom, match="recomputation failed"):
        y.backward()
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG state is back


def test_remat_leaves_an_uninitialised_cuda_alone(monkeypatch):
    """With CUDA available but not initialised, remat must not read CUDA's RNG state (that
    initialises CUDA, e.g. in a process that forks workers later)."""

    def refuse():
        raise AssertionError("remat initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda *a: refuse())
    replay = remat_mod._RNGReplay([])
    assert replay.cuda is None
    with replay.replay():
        pass


# ----------------------------------------------------------------------------- metric-loss errors
@pytest.mark.parametrize("make, exc, err", [
    (lambda a: (a.long(), a, a), TypeError, "anchor must be a floating Tensor"),
    (lambda a: (a, a.tolist(), a), TypeError, "positive must be a floating Tensor"),
    (lambda a: (a, a, a.int()), TypeError, "negative must be a floating Tensor"),
    (lambda a: (a, a[:, :2], a), ValueError, "share a shape"),
    (lambda a: (a[0, 0], a[0, 1], a[0, 2]), ValueError, "share a shape"),  # 0-d: no feature dimension
])
def test_triplet_bad_input(make, exc, err):
    with pytest.raises(exc, match=err):
        losses.triplet_loss(*make(_r(2, 3)))


def test_triplet_single_vectors():
    a, p, n = _r(3), _r(3, seed=1), _r(3, seed=2)
    want = F.relu((a - p + 1e-6).norm() - (a - n + 1e-6).norm() + 2.0)
    torch.testing.assert_close(losses.triplet_loss(a, p, n, margin=2.0, reduction="none"), want)
    torch.testing.assert_close(losses.triplet_loss(a, p, n, margin=2.0), want)


@pytest.mark.parametrize("make, err", [
    (lambda e, y: (e.long(), y), "embeddings must be a floating"),
    (lambda e, y: (e.tolist(), y), "embeddings must be a floating"),
    (lambda e, y: (e[None], y), "embeddings must be a floating"),
    (lambda e, y: (e[0], y), "embeddings must be a floating"),
    (lambda e, y: (e, y.tolist()), "labels must be shaped"),
    (lambda e, y: (e, y[:, None]), "labels must be shaped"),
    (lambda e, y: (e, torch.zeros(3, dtype=torch.long)), "labels must be shaped"),
])
def test_contrastive_bad_input(make, err):
    e, y = _r(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=err):
        losses.contrastive_loss(*make(e, y))


class _LogitsRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the row count of every matmul whose output has V columns (a chunk of logits)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == self.vocab:
            self.rows.append(out.shape[0])
        return out


@pytest.mark.parametrize("n, vocab, want", [
    (1100, 4099, [511, 511, 78]),  # 2^21 // V tokens per chunk: about 8 MiB of float32 logits
    (6, 7, [6]),  # a batch smaller than a chunk: one chunk
    (3, 2**21 + 1, [1, 1, 1]),  # a vocabulary over 2^21: one token at a time, never none
    (2**20 + 8, 1, [2**20 + 8]),  # V = 1: the whole 2^21-logit budget for tokens
])
def test_default_chunk_holds_about_two_to_the_21_logits(n, vocab, want):
    h, w = torch.randn(n, 1), torch.randn(vocab, 1)
    t = torch.zeros(n, dtype=torch.long)
    rec = _LogitsRows(vocab)
    with rec:
        ce.linear_cross_entropy(h, w, t)
    assert rec.rows == want


class _WeightGradRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the inner (token) dimension of every matmul whose output is shaped like the weight."""

    def __init__(self, weight_shape):
        super().__init__()
        self.shape, self.rows = tuple(weight_shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(out.shape) == self.shape:
            self.rows.append(args[-2].shape[-1])
        return out


@pytest.mark.parametrize("n, vocab, chunk, want", [
    (5000, 4096, None, [2048, 2048, 904]),  # 2^23 // V rows per weight-gradient matmul (~16 MiB of bf16)
    (2048, 4096, 500, [2048]),  # the batch fits the buffer: one matmul, even with a partial last chunk
    (2300, 4096, 500, [2000, 300]),  # else whole chunks only: 4 chunks of 500, then the rest
    (2**22 + 8, 1, None, [2**22 + 8]),  # V = 1: the whole 2^23-row budget
])
def test_bf16_weight_gradient_takes_one_matmul_per_group_of_two_to_the_23_logits(n, vocab, chunk, want):
    h = torch.randn(n, 1).bfloat16().requires_grad_()
    w = torch.randn(vocab, 1).bfloat16().requires_grad_()
    t = torch.zeros(n, dtype=torch.long)
    rec = _WeightGradRows(w.shape)
    with rec:
        loss = ce.linear_cross_entropy(h, w, t, chunk_size=chunk)
    assert rec.rows == want
    (gw,) = torch.autograd.grad(loss, w)
    assert gw.dtype == torch.bfloat16 and gw.shape == w.shape


def test_low_precision_empty_batch_has_exactly_zero_gradients():
    for dtype in (torch.bfloat16, torch.float16):
        torch.full((7, 3), float("nan"), dtype=torch.float32)  # leave garbage where the buffers may land
        h = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
        w = torch.randn(7, 3).to(dtype).requires_grad_()
        b = torch.randn(7).to(dtype).requires_grad_()
        for reduction in ("mean", "sum"):
            loss = ce.linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), bias=b, reduction=reduction)
            assert loss.item() == 0.0
            gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
            assert gh.shape == (0, 3) and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_a_single_grad_level_takes_the_forwards_gradient():
    """Under one torch.func.grad the forward's precomputed gradient is used, as in eager autograd:
    the logits are computed once, and the gradients equal eager's bit for bit."""
    from torch.func import grad

    h, w = _r(7, 3, dtype=torch.float32), _r(5, 3, seed=1, dtype=torch.float32)
    t = torch.tensor([0, 1, 4, -100, 2, 3, 3])
    for eps, zl in ((0.0, 0.0), (0.1, 0.01)):
        f = lambda h, w: ce.linear_cross_entropy(h, w, t, label_smoothing=eps, z_loss=zl, chunk_size=3)  # noqa: E731
        rec = _LogitsRows(5)
        with rec:
            gh, gw = grad(f, argnums=(0, 1))(h, w)
        assert rec.rows == [3, 3, 1]
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        rec = _LogitsRows(5)
        with rec:
            f(hh, ww).backward()
        assert rec.rows == [3, 3, 1]
        assert torch.equal(gh, hh.grad) and torch.equal(gw, ww.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("trained", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)])
def test_gradients_when_only_some_inputs_are_trained(trained, reduction):
    """A frozen LM head (only hidden trains), a frozen trunk (only the head), a frozen bias..."""
    h, w, b = _r(6, 3), _r(5, 3, seed=1), _r(5, seed=2)
    t = torch.tensor([0, 4, -100, 2, 1, 1])
    ins = [x.clone().requires_grad_(r) for x, r in zip((h, w, b), trained)]
    ref = [x.clone().requires_grad_(r) for x, r in zip((h, w, b), trained)]
    cot = _r(6, seed=3) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    got = torch.autograd.grad(ce.linear_cross_entropy(ins[0], ins[1], t, bias=ins[2], reduction=reduction, chunk_size=4),
                              [x for x in ins if x.requires_grad], cot)
    want = torch.autograd.grad(F.cross_entropy(F.linear(ref[0], ref[1], ref[2]), t, reduction=reduction),
                               [x for x in ref if x.requires_grad], cot)
    torch.testing.assert_close(got, want)


class _GradMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matmuls whose output has d columns (a gradient of hidden or of the weight)."""

    _MM = (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)

    def __init__(self, d):
        super().__init__()
        self.d, self.count = d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._MM and out.shape[-1] == self.d:
            self.count += 1
        return out


def test_a_forward_without_gradients_computes_no_gradient():
    """Evaluation (no input requires grad, or torch.no_grad) pays for the loss only."""
    h, w, b = _r(6, 3), _r(5, 3, seed=1), _r(5, seed=2)
    t = torch.tensor([0, 4, -100, 2, 1, 1])
    for reduction in ("mean", "sum"):
        rec = _GradMatmuls(3)
        with rec:
            ce.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=4)
            with torch.no_grad():
                ce.linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t, bias=b, reduction=reduction)
        h, w = h.detach(), w.detach()
        assert rec.count == 0
        rec = _GradMatmuls(3)
        with rec:  # a training forward does compute them (the backward then only scales)
            ce.linear_cross_entropy(h.requires_grad_(), w, t, bias=b, reduction=reduction, chunk_size=4)
        h = h.detach()
        assert rec.count > 0
