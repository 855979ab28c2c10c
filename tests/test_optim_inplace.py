"""The speed paths of the optimizers: in-place writes into buffers an update allocated itself
(``foreach.div_into``/``lerp_into``/``can_write``, the fused LAMB/LARS update, Adafactor's and
schedule-free's in-place chains). They must give the bits of the plain formulation, never write
into the caller's grads, params or state, and step aside under autograd and torch.func."""

from __future__ import annotations

import pytest
import torch

from aam_func import optim, tree
from aam_func.optim import foreach
from aam_func.optim.transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace
from aam_func.optim.large_batch import scale_by_trust_ratio


def _params():
    g = torch.Generator().manual_seed(0)
    return {"embed": {"weight": torch.randn(12, 6, generator=g)},
            "blocks": {"0": {"fc": {"weight": torch.randn(6, 10, generator=g), "bias": torch.randn(10, generator=g)},
                             "ln": {"weight": torch.rand(6, generator=g) + 0.5}}},
            "head": {"weight": torch.randn(8, 6, generator=g)}}


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    return tree.map(lambda p: torch.randn(p.shape, generator=g) * 0.1, params)


def _run(opt, steps=5):
    params = _params()
    state = opt.init(params)
    out = []
    for k in range(steps):
        u, state = opt.update(_grads(params, k), state, params)
        params = optim.apply_updates(params, u)
        out.append(dict(tree.flatten(u)))
    return out, dict(tree.flatten(state)), dict(tree.flatten(params))


def _assert_same_bits(a, b):
    (ua, sa, pa), (ub, sb, pb) = a, b
    for x, y in zip(ua, ub):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[n], y[n]) for n in x), [n for n in x if not torch.equal(x[n], y[n])]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


SCHED = optim.warmup_cosine(1e-2, 2, 10)
MASK = optim.decay_mask(_params())


@pytest.mark.parametrize("lr, wd, mask", [(1e-2, 0.0, None), (SCHED, 0.1, MASK), (1e-2, 0.1, None)])
def test_fused_lamb_equals_its_chain_bit_for_bit(lr, wd, mask):
    chained = optim.chain(scale_by_adam(0.9, 0.999, 1e-6), add_decayed_weights(wd, mask), scale_by_trust_ratio(),
                          scale_by_learning_rate(lr))
    _assert_same_bits(_run(optim.lamb(lr, weight_decay=wd, mask=mask, fused=False)), _run(chained))
    # the default takes the direction from torch's fused Adam kernel: float32 rounding apart
    (uf, sf, pf), (uc, sc, pc) = _run(optim.lamb(lr, weight_decay=wd, mask=mask)), _run(chained)
    for a, b in zip(uf + [sf, pf], uc + [sc, pc]):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any(not torch.equal(a[n], b[n]) for a, b in zip(uf, uc) for n in a)  # the kernel did run


def test_lamb_fused_flag_is_checked():
    with pytest.raises(TypeError, match="fused must be True or False, got None"):
        optim.lamb(1e-3, fused=None)


@pytest.mark.parametrize("lr, wd, mask, momentum, nesterov", [
    (1.0, 0.0, None, 0.9, False), (SCHED, 0.1, MASK, 0.9, True), (0.5, 0.1, MASK, 0.0, False), (0.5, 0.0, None, 0.0, False)])
def test_fused_lars_equals_its_chain_bit_for_bit(lr, wd, mask, momentum, nesterov):
    parts = [add_decayed_weights(wd, mask), scale_by_trust_ratio(trust_coefficient=0.01)]
    if momentum:
        parts.append(trace(momentum, nesterov))
    chained = optim.chain(*parts, scale_by_learning_rate(lr))
    fused = optim.lars(lr, weight_decay=wd, mask=mask, trust_coefficient=0.01, momentum=momentum, nesterov=nesterov)
    _assert_same_bits(_run(fused), _run(chained))


OPTS = {
    "schedule_free": lambda: optim.schedule_free_adamw(1e-2),
    "schedule_free_wd": lambda: optim.schedule_free_adamw(SCHED, weight_decay=0.1, warmup_steps=2),
    "ema": lambda: optim.ema(optim.adamw(1e-2), 0.9),
    "lookahead": lambda: optim.lookahead(optim.adamw(1e-2), 2, 0.5),
    "lamb": lambda: optim.lamb(1e-2, weight_decay=0.1, fused=False),
    "lamb_fused": lambda: optim.lamb(1e-2, weight_decay=0.1),
    "lars": lambda: optim.lars(1.0, weight_decay=0.1, nesterov=True),
    "adafactor": lambda: optim.adafactor(SCHED, weight_decay=0.1),
    "muon": lambda: optim.muon(0.02),
    "muon_f32": lambda: optim.muon(SCHED, ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw"),
}


@pytest.mark.parametrize("name", sorted(OPTS))
def test_updates_leave_grads_params_and_state_untouched(name):
    opt = OPTS[name]()
    params = _params()
    state = opt.init(params)
    for k in range(4):  # covers lookahead's sync steps and ema's first step
        grads = _grads(params, k)
        before = [dict(tree.flatten(tree.map(torch.clone, t))) for t in (grads, params, state)]
        u, new_state = opt.update(grads, state, params)
        for t, b in zip((grads, params, state), before):
            assert all(torch.equal(x, b[n]) for n, x in tree.flatten(t).items()), name
        params, state = optim.apply_updates(params, u), new_state


@pytest.mark.parametrize("name", sorted(OPTS))
def test_in_place_paths_give_the_bits_of_the_plain_path(name, monkeypatch):
    fast = _run(OPTS[name](), steps=4)
    # what runs under torch.func transforms: per-leaf ops, fresh tensors, no in-place writes
    monkeypatch.setattr(foreach, "use_foreach", lambda: False)
    assert not foreach.can_write([torch.zeros(2)])
    plain = _run(OPTS[name](), steps=4)
    (uf, sf, pf), (up, sp, pp) = fast, plain
    for a, b in zip(uf + [sf, pf], up + [sp, pp]):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7, msg=f"{name}: {n}")


def test_into_helpers_step_aside_for_autograd():
    x = torch.randn(3, requires_grad=True)
    y = torch.rand(3) + 1.0
    y0 = y.clone()
    assert not foreach.can_write([x], [y])
    (q,) = foreach.div_into([x], [y])
    (r,) = foreach.lerp_into([x], [y], 0.25)
    assert torch.equal(y, y0)  # not written: an out= op cannot record the graph
    (q.sum() + r.sum()).backward()
    torch.testing.assert_close(x.grad, 1 / y0 + 0.75)
    # without autograd they write into the given buffers, with the plain ops' bits
    a, b = torch.randn(5), torch.rand(5) + 1.0
    want_div, want_lerp = a / b, torch.lerp(a, b, 0.3)
    buf = b.clone()
    assert foreach.div_into([a], [buf])[0] is buf and torch.equal(buf, want_div)
    buf = b.clone()
    assert foreach.lerp_into([a], [buf], 0.3)[0] is buf and torch.equal(buf, want_lerp)
