"""optim/transforms.py paths the suite did not check (found by mutation testing): the list form
of the learning-rate step that fused transformations (lamb) end in, and ``scale_by_adam``'s
``fused=True`` path."""

import torch

from aam_func import optim
from aam_func.optim.transforms import learning_rate_scale_


def _leaves(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, generator=g, dtype=dtype), torch.randn(2, 2, generator=g, dtype=dtype)]


def sched(t):
    return 0.1 * (1.0 + torch.as_tensor(t, dtype=torch.float64))  # 0.1, 0.2, 0.3, ... at counts 0, 1, 2


def test_learning_rate_scale_is_scale_by_learning_rate_on_a_list():
    """Its contract: ``(-lr u, new state)`` with the bits and state of
    ``scale_by_learning_rate(lr)`` (flip_sign), for a float, a 0-d tensor and a schedule, step
    after step; ``own=True`` scales the caller's buffers in place, ``own=False`` leaves them."""
    for lr in (0.5, torch.tensor(0.25, dtype=torch.float64), sched):
        ref = optim.scale_by_learning_rate(lr)
        ref_state = ref.init({"a": torch.zeros(3), "b": torch.zeros(2, 2)})
        state = dict(ref_state)
        for step in range(3):
            us = _leaves(step)
            want, ref_state = ref.update({"a": us[0], "b": us[1]}, ref_state)
            kept, before = [u.clone() for u in us], state
            got, state = learning_rate_scale_(us, lr, state, own=False)
            assert all(torch.equal(u, k) for u, k in zip(us, kept))  # not owned: untouched
            assert torch.equal(got[0], want["a"]) and torch.equal(got[1], want["b"])
            got_own, _ = learning_rate_scale_(kept, lr, before, own=True)
            assert torch.equal(got_own[0], want["a"]) and torch.equal(got_own[1], want["b"])
            assert got_own[0] is kept[0]  # owned: scaled in place
            assert state.keys() == ref_state.keys()
            for k in state:
                assert torch.equal(torch.as_tensor(state[k]), torch.as_tensor(ref_state[k]))
            if callable(lr) and not isinstance(lr, torch.Tensor):
                assert int(state["count"]) == step + 1
                factor = -0.1 * (step + 1)
                torch.testing.assert_close(got[0], factor * _leaves(step)[0], rtol=1e-12, atol=0)


def test_lamb_with_a_schedule_matches_its_chain():
    """lamb's fused update ends in ``learning_rate_scale_``; with a schedule it must read the
    rate at each step's count and keep the count, as the chain it stands for."""
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "b": torch.tensor([[0.3, -0.1]], dtype=torch.float64)}
    fused = optim.lamb(learning_rate=sched, weight_decay=0.1, fused=False)
    ref = optim.chain(optim.scale_by_adam(eps=1e-6), optim.add_decayed_weights(0.1), optim.scale_by_trust_ratio(),
                      optim.scale_by_learning_rate(sched))
    s1, s2 = fused.init(params), ref.init(params)
    for step in range(3):
        gs = _leaves(10 + step)
        g = {"w": gs[0], "b": gs[1][:1]}
        u1, s1 = fused.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        for k in params:
            assert torch.equal(u1[k], u2[k])  # "tested bit for bit"
    assert int(s1["3"]["count"]) == 3


def test_fused_adam_direction_agrees_with_the_foreach_one():
    """``scale_by_adam(fused=True)`` (torch's fused kernel in plain eager) is the same direction
    and state as the foreach form to float32 rounding, step by step (bias corrections at t = 1, 2,
    3 and the count in the state)."""
    shapes = {"w": (4, 3), "b": (3,)}
    fused, plain = optim.scale_by_adam(fused=True), optim.scale_by_adam(fused=False)
    params = {k: torch.zeros(s) for k, s in shapes.items()}
    sf, sp = fused.init(params), plain.init(params)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        uf, sf = fused.update(grads, sf, params)
        up, sp = plain.update(grads, sp, params)
        assert int(sf["count"]) == int(sp["count"]) == step + 1
        for k in shapes:
            torch.testing.assert_close(uf[k], up[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sf["mu"][k], sp["mu"][k], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(sf["nu"][k], sp["nu"][k], rtol=1e-6, atol=1e-7)
    # the first step is m̂/(√v̂ + eps) = g/(|g| + eps): a sign, so a wrong sign or scale shows
    u1, _ = fused.update({"w": torch.full((4, 3), 2.0), "b": torch.full((3,), -3.0)}, fused.init(params), params)
    torch.testing.assert_close(u1["w"], torch.ones(4, 3))
    torch.testing.assert_close(u1["b"], -torch.ones(3))


def test_adam_refuses_a_malformed_state():
    """The step count of an Adam state must be a 0-d integer tensor (a Python int, a float tensor
    or a shaped one is refused), and each moment leaf must have its gradient's shape and dtype:
    refused by name before any kernel runs (fused or not)."""
    import pytest

    params = {"w": torch.zeros(3)}
    grads = {"w": torch.ones(3)}
    for fused in (False, True):
        t = optim.scale_by_adam(fused=fused)
        state = t.init(params)
        for bad in (3, torch.tensor(3.0), torch.tensor([3]), torch.zeros(1, 1, dtype=torch.int64)):
            with pytest.raises(ValueError, match="adam state 'count' must be a 0-d integer tensor"):
                t.update(grads, dict(state, count=bad), params)
        for key in ("mu", "nu"):  # a moment of another dtype or shape than its gradient, named
            with pytest.raises(ValueError, match=f"adam state '{key}' leaf 'w' has dtype torch.float64"):
                t.update(grads, dict(state, **{key: {"w": torch.zeros(3, dtype=torch.float64)}}), params)
            with pytest.raises(ValueError, match=f"adam state '{key}' leaf 'w' has shape"):
                t.update(grads, dict(state, **{key: {"w": torch.zeros(4)}}), params)
        u, s = t.update(grads, dict(state, count=torch.tensor(4)), params)  # an int64 0-d count is fine
        assert int(s["count"]) == 5


def test_scale_refuses_a_schedule():
    """``scale`` takes a number or a 0-d tensor; a schedule (a callable) is refused, pointing at
    ``scale_by_schedule``; a 0-d tensor (not a schedule, though torch could call it) is taken."""
    import pytest

    with pytest.raises(TypeError, match="use scale_by_schedule for schedules"):
        optim.scale(sched)
    t = optim.scale(torch.tensor(0.5, dtype=torch.float64))
    u, _ = t.update({"w": torch.ones(2, dtype=torch.float64)}, t.init({}))
    torch.testing.assert_close(u["w"], torch.full((2,), 0.5, dtype=torch.float64))


def test_clip_by_global_norm_checks_a_number_bound_and_takes_a_tensor_one():
    """``max_norm`` a number must be finite and > 0 (0 would zero every update), refused by name;
    a 0-d tensor bound (a traced or scheduled value) is taken as it is."""
    import pytest

    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            optim.clip_by_global_norm(bad)
    t = optim.clip_by_global_norm(torch.tensor(1.0))
    u, s = t.update({"w": torch.tensor([3.0, 4.0])}, t.init({}))
    torch.testing.assert_close(u["w"], torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))
    assert float(s["global_norm"]) == 5.0


def test_clip_by_global_norm_is_torchs_clip_grad_norm():
    """``u = g * min(1, max_norm / (‖g‖ + 1e-6))``: torch.nn.utils.clip_grad_norm_'s factor, to
    float64 rounding, clipped or not."""
    g = torch.Generator().manual_seed(13)
    grads = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    norm = float(torch.sqrt(sum(v.pow(2).sum() for v in grads.values())))
    for max_norm in (0.5 * norm, norm, 2.0 * norm):
        t = optim.clip_by_global_norm(max_norm)
        u, _ = t.update(grads, t.init({}))
        ps = [torch.zeros_like(v, requires_grad=True) for v in grads.values()]
        for p_, v in zip(ps, grads.values()):
            p_.grad = v.clone()
        torch.nn.utils.clip_grad_norm_(ps, max_norm)
        for k, p_ in zip(grads, ps):
            torch.testing.assert_close(u[k], p_.grad, rtol=1e-13, atol=0)


def test_one_buffer_transformations_refuse_a_buffer_of_another_dtype():
    """trace's and lion's buffers must match their gradients' dtype and shape (checked before any
    kernel runs, the state named)."""
    import pytest

    grads = {"w": torch.ones(3)}
    for t, key, what in ((optim.trace(0.9), "trace", "trace state"), (optim.scale_by_lion(), "mu", "lion state 'mu'")):
        with pytest.raises(ValueError, match=f"{what} leaf 'w' has dtype torch.float64"):
            t.update(grads, {key: {"w": torch.zeros(3, dtype=torch.float64)}})
        with pytest.raises(ValueError, match=f"{what} leaf 'w' has shape"):
            t.update(grads, {key: {"w": torch.zeros(2)}})
