"""Losses: parity with torch where torch has the loss, the properties in proofs/losses.md, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch.func import grad, vmap

from aam_func.losses import (
    contrastive_loss,
    focal_loss,
    label_smoothing_loss,
    lm_loss,
    shift_labels,
    triplet_loss,
)


def _r(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _t(n, c, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore:
        t = torch.where(torch.rand(n, generator=g) < 0.2, torch.full_like(t, -100), t)
    t[0] = 0
    return t


cls_inputs = st.tuples(st.integers(1, 10), st.integers(2, 7), st.integers(0, 2**16), st.sampled_from([1.0, 10.0]))


# ----------------------------------------------------------------------------- focal
@given(inp=cls_inputs, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_focal_gamma_zero_is_cross_entropy(inp, reduction):
    n, c, seed, scale = inp
    z, t = _r(n, c, seed=seed, scale=scale), _t(n, c, seed)
    ce = F.cross_entropy(z, t, reduction=reduction)
    if reduction == "none":
        ce = torch.where(t != -100, ce, torch.zeros_like(ce))
    torch.testing.assert_close(focal_loss(z, t, gamma=0.0, reduction=reduction), ce)


def test_focal_per_class_alpha_gamma_zero_is_weighted_ce():
    z, t, a = _r(8, 4), _t(8, 4), torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    want = F.cross_entropy(z, t, weight=a, reduction="sum") / (t != -100).sum()
    torch.testing.assert_close(focal_loss(z, t, alpha=a, gamma=0.0), want)
    torch.testing.assert_close(focal_loss(z, t, alpha=0.3, gamma=0.0), 0.3 * F.cross_entropy(z, t))


@given(inp=cls_inputs, gamma=st.floats(0.0, 5.0))
def test_focal_nonnegative_and_at_most_ce(inp, gamma):
    n, c, seed, scale = inp
    z, t = _r(n, c, seed=seed, scale=scale), _t(n, c, seed)
    fl = focal_loss(z, t, gamma=gamma, reduction="none")
    ce = F.cross_entropy(z, t, reduction="none") * (t != -100)
    assert (fl >= 0).all()
    assert (fl <= ce + 1e-12).all()


def test_focal_formula_and_stability():
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(z, -1)[0, 1]
    torch.testing.assert_close(focal_loss(z, torch.tensor([1]), alpha=0.25, gamma=2.0), -0.25 * (1 - p) ** 2 * p.log())
    # p_t rounds to 1: finite value and finite (zero) gradient even for gamma < 1
    z = torch.tensor([[60.0, -60.0]], requires_grad=True)
    for gamma in (0.5, 2.0):
        loss = focal_loss(z, torch.tensor([0]), gamma=gamma)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # bf16 logits accumulate in float32
    zb = _r(4, 5, dtype=torch.float32).bfloat16()
    assert focal_loss(zb, _t(4, 5)).dtype == torch.float32


def test_focal_ignored_targets_and_all_ignored():
    z, t = _r(5, 3, seed=2).requires_grad_(), torch.tensor([0, -100, 2, -100, 1])
    full = focal_loss(z, t, reduction="none")
    assert full[1] == 0 and full[3] == 0
    torch.testing.assert_close(focal_loss(z, t), full.sum() / 3)
    none = focal_loss(z, torch.full((5,), -100))
    assert none.item() == 0.0 and torch.count_nonzero(torch.autograd.grad(none, z)[0]) == 0


# ----------------------------------------------------------------------------- label smoothing
@given(inp=cls_inputs, eps=st.floats(0.0, 0.95), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_label_smoothing_matches_torch(inp, eps, reduction):
    n, c, seed, scale = inp
    z, t = _r(n, c, seed=seed, scale=scale), _t(n, c, seed)
    want = F.cross_entropy(z, t, label_smoothing=eps, reduction=reduction)
    if reduction == "none":
        want = want * (t != -100)
    torch.testing.assert_close(label_smoothing_loss(z, t, eps, reduction=reduction), want)


@given(inp=cls_inputs, eps=st.floats(0.0, 0.95))
@example(inp=(2, 3, 0, 1.0), eps=5e-324)  # found by the thorough profile: eps / c underflows to 0
def test_label_smoothing_bounds(inp, eps):
    """H(q) <= smoothed CE (Gibbs), with equality at p = q; eps = 0 is CE."""
    n, c, seed, scale = inp
    z, t = _r(n, c, seed=seed, scale=scale), _t(n, c, seed, ignore=False)
    q_hi, q_lo = 1 - eps + eps / c, eps / c
    entropy = -(q_hi * math.log(q_hi) + ((c - 1) * q_lo * math.log(q_lo) if q_lo > 0 else 0.0))
    per = label_smoothing_loss(z, t, eps, reduction="none")
    assert (per >= entropy - 1e-9).all()
    q = torch.full((1, c), q_lo, dtype=torch.float64)
    q[0, 0] = q_hi
    at_q = label_smoothing_loss(q.log(), torch.tensor([0]), eps)
    if eps > 0 and q_lo == 0:  # eps / c underflows (eps = 5e-324): the loss weighs -log 0 = inf by eps > 0
        assert at_q.item() == math.inf
    else:
        torch.testing.assert_close(at_q, torch.tensor(entropy, dtype=torch.float64))
    torch.testing.assert_close(label_smoothing_loss(z, t, 0.0), F.cross_entropy(z, t))


# ----------------------------------------------------------------------------- contrastive
def _supcon_loop(e, y, tau):
    u = F.normalize(e, dim=-1)
    total, anchors = 0.0, 0
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(u[i] @ u[a]) / tau) for a in range(len(y)) if a != i)
        total += -sum(float(u[i] @ u[p]) / tau - math.log(denom) for p in pos) / len(pos)
        anchors += 1
    return total / max(anchors, 1)


@given(n=st.integers(2, 7), d=st.integers(1, 4), classes=st.integers(1, 4), seed=st.integers(0, 2**16),
       tau=st.sampled_from([0.07, 0.5, 1.0]))
def test_supcon_matches_definition_and_scale_invariant(n, d, classes, seed, tau):
    e = _r(n, d, seed=seed)
    y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    loss = contrastive_loss(e, y, temperature=tau)
    assert math.isclose(loss.item(), _supcon_loop(e, y, tau), rel_tol=1e-9, abs_tol=1e-9)
    torch.testing.assert_close(contrastive_loss(3.0 * e, y, temperature=tau), loss)
    assert loss.item() >= 0.0  # each term is −log of a probability... averaged over ≥ 1 positives


def test_contrastive_no_positives_is_zero_not_nan():
    e = _r(4, 3).requires_grad_()
    for labels in (torch.arange(4), torch.arange(1)):
        x = e[: len(labels)]
        loss = contrastive_loss(x, labels)
        (g,) = torch.autograd.grad(loss, e)
        assert loss.item() == 0.0 and torch.count_nonzero(g) == 0
        assert contrastive_loss(x, labels, kind="margin").item() == 0.0 or len(labels) > 1


def test_contrastive_margin_form():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    # pairs (0,1): same, d=5 -> 25; (0,2): diff, d=0.5 -> (1-0.5)^2; (1,2): diff, d=4.5 -> 0
    torch.testing.assert_close(contrastive_loss(e, y, margin=1.0, kind="margin"), torch.tensor((25 + 0.25) / 3, dtype=torch.float64))
    same = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)  # d = 0: finite gradient
    (g,) = torch.autograd.grad(contrastive_loss(same, torch.tensor([0, 1]), kind="margin"), same)
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- triplet
@given(n=st.integers(1, 6), d=st.integers(1, 5), p=st.sampled_from([1, 2, 3]), swap=st.booleans(),
       margin=st.sampled_from([0.5, 2.0]), reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_triplet_matches_torch(n, d, p, swap, margin, reduction, seed):
    a, pos, neg = _r(n, d, seed=seed), _r(n, d, seed=seed + 1), _r(n, d, seed=seed + 2)
    want = F.triplet_margin_loss(a, pos, neg, margin=margin, p=p, swap=swap, reduction=reduction)
    got = triplet_loss(a, pos, neg, margin=margin, p=p, swap=swap, reduction=reduction)
    torch.testing.assert_close(got, want)
    assert (got >= 0).all()


def test_triplet_zero_when_margin_holds_and_grads_match():
    a = torch.zeros(3, 2, dtype=torch.float64)
    pos, neg = a + 0.1, a + 5.0
    assert triplet_loss(a, pos, neg, margin=1.0).item() == 0.0
    a, pos, neg = (_r(4, 3, seed=s).requires_grad_() for s in range(3))
    torch.testing.assert_close(
        torch.autograd.grad(triplet_loss(a, pos, neg, swap=True), (a, pos, neg)),
        torch.autograd.grad(F.triplet_margin_loss(a, pos, neg, swap=True), (a, pos, neg)),
    )
    assert triplet_loss(*(torch.zeros(0, 3),) * 3).item() == 0.0  # empty batch: 0, documented


# ----------------------------------------------------------------------------- lm_loss
def test_lm_loss_focal_options():
    z, t = _r(2, 5, 7), torch.tensor([[1, 2, 3, -100, 0], [6, 6, -100, -100, 1]])
    plain = lm_loss(z, t)
    torch.testing.assert_close(lm_loss(z, t, focal_gamma=0.0, focal_alpha=1.0), plain)
    torch.testing.assert_close(lm_loss(z, t, focal_alpha=0.5), 0.5 * plain.double())
    fl = lm_loss(z, t, focal_gamma=2.0)
    torch.testing.assert_close(fl, focal_loss(z, t, gamma=2.0))
    assert fl < plain
    sm = lm_loss(z, t, label_smoothing=0.1, focal_gamma=1e-12)
    torch.testing.assert_close(sm, lm_loss(z, t, label_smoothing=0.1).double())
    zz = z.clone().requires_grad_()
    none = lm_loss(zz, torch.full((2, 5), -100), focal_gamma=2.0)
    assert none.item() == 0.0 and torch.count_nonzero(torch.autograd.grad(none, zz)[0]) == 0


def test_losses_under_vmap_grad():
    z, t = _r(3, 4, 5), torch.tensor([[0, 1, 2, 3], [4, -100, 0, 1], [-100] * 4])
    per = vmap(grad(lambda z, t: focal_loss(z, t, gamma=2.0)))(z, t)
    for i in range(3):
        torch.testing.assert_close(per[i], grad(lambda z: focal_loss(z, t[i], gamma=2.0))(z[i]))
    assert torch.count_nonzero(per[2]) == 0


def test_shift_labels_unchanged():
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[True, True, True, False]])
    assert shift_labels(labels).tolist() == [[2, 3, 4, -100]]
    assert shift_labels(labels, mask).tolist() == [[2, 3, -100, -100]]


@pytest.mark.parametrize(
    "call, err",
    [
        (lambda z, t: focal_loss(z, t, gamma=-1.0), "gamma"),
        (lambda z, t: focal_loss(z, t, alpha=torch.ones(3)), "alpha"),
        (lambda z, t: focal_loss(z, t, alpha=-1.0), "alpha"),
        (lambda z, t: focal_loss(z, torch.tensor([0, 4])), "targets contains 4"),
        (lambda z, t: focal_loss(z, t, reduction="avg"), "reduction"),
        (lambda z, t: focal_loss(z, t[:1]), "disagree"),
        (lambda z, t: label_smoothing_loss(z, t, 1.0), "smoothing"),
        (lambda z, t: label_smoothing_loss(z, t, -0.1), "smoothing"),
        (lambda z, t: label_smoothing_loss(z, torch.tensor([0, -5])), "targets contains -5"),
        (lambda z, t: contrastive_loss(z, t, temperature=0.0), "temperature"),
        (lambda z, t: contrastive_loss(z, t[:1]), "labels"),
        (lambda z, t: contrastive_loss(z, t, kind="ntxent"), "kind"),
        (lambda z, t: triplet_loss(z, z, z[:1]), "share a shape"),
        (lambda z, t: triplet_loss(z, z, z, margin=-1.0), "margin"),
    ],
)
def test_bad_input(call, err):
    z, t = _r(2, 4), torch.tensor([0, 3])
    with pytest.raises((ValueError, TypeError), match=err):
        call(z, t)
