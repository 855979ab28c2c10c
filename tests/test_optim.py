"""aam_func.optim: parity with torch.optim and transformers' schedulers, compile/vmap behaviour,
combinator properties and error paths. Formulas and claims: proofs/optim.md."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from aam_func import optim, tree

# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


X = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))


def _batch(i, size=8):
    return X[i * size : (i + 1) * size], Y[i * size : (i + 1) * size]


def _params_of(net) -> dict:
    return tree.unflatten({k: v.detach().clone() for k, v in net.named_parameters()})


def _loss_fn(net):
    def loss(params, x, y):
        return ((functional_call(net, tree.flatten(params), (x,)) - y) ** 2).mean()

    return loss


def _rel(a: dict, b: dict) -> float:
    """Largest per-leaf ``max|a - b| / max|b|``."""
    fa, fb = tree.flatten(a), tree.flatten(b)
    return max(((fa[k] - fb[k]).abs().max() / fb[k].abs().max().clamp_min(1e-12)).item() for k in fb)


def _run_pair(make_torch, ours, steps=200):
    """Train the same MLP with torch.optim and with ``ours`` on the same batches."""
    net = _mlp()
    tnet = copy.deepcopy(net)
    topt = make_torch(tnet.parameters())
    params = _params_of(net)
    state = ours.init(params)
    loss = _loss_fn(net)
    for s in range(steps):
        x, y = _batch(s % 8)
        topt.zero_grad()
        ((tnet(x) - y) ** 2).mean().backward()
        topt.step()
        updates, state = ours.update(grad(loss)(params, x, y), state, params)
        params = optim.apply_updates(params, updates)
    return params, _params_of(tnet), state


def _tree(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": {"weight": torch.randn(6, 4, generator=g) * scale},
        "blocks": {"0": {"attn": {"qkv": {"weight": torch.randn(12, 4, generator=g) * scale,
                                          "bias": torch.randn(12, generator=g) * scale}},
                         "ln1": {"weight": torch.randn(4, generator=g) * scale,
                                 "bias": torch.randn(4, generator=g) * scale}}},
        "lm_head": {"weight": torch.randn(6, 4, generator=g) * scale},
    }


# ----------------------------------------------------------------------------- torch.optim parity


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(
    "name, make_torch, ours",
    [
        ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
         lambda f: optim.adamw(1e-3, weight_decay=0.01, fused=f)),
        ("adamw_strong", lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
         lambda f: optim.adamw(1e-2, 0.8, 0.99, 1e-6, weight_decay=0.1, fused=f)),
        ("adam", lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True), lambda f: optim.adam(1e-2, fused=f)),
        ("adam_l2", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=True),
         lambda f: optim.adam(1e-2, weight_decay=0.1, fused=f)),
    ],
)
def test_adam_family_follows_torch_for_200_steps(name, make_torch, ours, fused):
    ours_p, torch_p, state = _run_pair(make_torch, ours(fused))
    assert int(state["count"]) == 200
    assert _rel(ours_p, torch_p) <= 1e-5


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-2)])
def test_sgd_follows_torch_for_200_steps(momentum, nesterov, wd):
    ours_p, torch_p, _ = _run_pair(
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=momentum, nesterov=nesterov, weight_decay=wd, foreach=True),
        optim.sgd(1e-2, momentum=momentum, nesterov=nesterov, weight_decay=wd),
    )
    assert _rel(ours_p, torch_p) <= 1e-5


def test_adam_matches_torch_bitwise_without_decay():
    # the foreach path does torch's foreach Adam's operations in order; the fused path calls
    # torch's fused kernel: both land on torch's floats exactly
    a, b, _ = _run_pair(lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True), optim.adam(1e-2, fused=False), 50)
    assert _rel(a, b) == 0.0
    a, b, _ = _run_pair(lambda p: torch.optim.Adam(p, lr=1e-2, fused=True), optim.adam(1e-2, fused=True), 50)
    assert _rel(a, b) == 0.0


def test_adamw_with_schedule_follows_torch_with_lambdalr():
    sched = optim.warmup_cosine(1e-2, 10, 100)
    net = _mlp()
    tnet = copy.deepcopy(net)
    topt = torch.optim.AdamW(tnet.parameters(), lr=1e-2, weight_decay=0.05)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: sched(s) / 1e-2)
    opt = optim.adamw(sched, weight_decay=0.05)
    params, loss = _params_of(net), _loss_fn(net)
    state = opt.init(params)
    for s in range(100):
        x, y = _batch(s % 8)
        topt.zero_grad()
        ((tnet(x) - y) ** 2).mean().backward()
        topt.step()
        tsched.step()
        u, state = opt.update(grad(loss)(params, x, y), state, params)
        params = optim.apply_updates(params, u)
    assert _rel(params, _params_of(tnet)) <= 1e-5


def test_adamw_equals_its_chain_of_small_pieces():
    params = _tree(0)
    mask = optim.decay_mask(params)
    fused = optim.adamw(1e-2, weight_decay=0.1, mask=mask)
    pieces = optim.chain(optim.scale_by_adam(), optim.add_decayed_weights(0.1, mask), optim.scale_by_learning_rate(1e-2))
    p1, p2, s1, s2 = params, params, fused.init(params), pieces.init(params)
    for i in range(5):
        g = _tree(10 + i)
        u1, s1 = fused.update(g, s1, p1)
        u2, s2 = pieces.update(g, s2, p2)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u2)
    assert _rel(p1, p2) <= 1e-6
    # the undecayed leaves moved by the Adam direction only
    assert mask["blocks"]["0"]["ln1"]["weight"] is False


def test_eps_root_enters_under_the_root():
    g = {"w": torch.tensor([0.0, 1e-4, 1.0])}
    opt = optim.scale_by_adam(b1=0.0, b2=0.0, eps=0.0, eps_root=1e-8)
    u, _ = opt.update(g, opt.init(g))
    torch.testing.assert_close(u["w"], g["w"] / torch.sqrt(g["w"] ** 2 + 1e-8), rtol=1e-6, atol=0)


def test_lion_matches_the_paper_algorithm():
    params, lr, b1, b2, wd = _tree(0), 1e-3, 0.9, 0.99, 0.1
    opt = optim.lion(lr, b1, b2, weight_decay=wd)
    state = opt.init(params)
    ref_p, ref_m = tree.flatten(params), {k: torch.zeros_like(v) for k, v in tree.flatten(params).items()}
    for i in range(4):
        g = _tree(20 + i)
        u, state = opt.update(g, state, params)
        params = optim.apply_updates(params, u)
        for k, gk in tree.flatten(g).items():
            c = b1 * ref_m[k] + (1 - b1) * gk
            ref_p[k] = ref_p[k] - lr * (torch.sign(c) + wd * ref_p[k])
            ref_m[k] = b2 * ref_m[k] + (1 - b2) * gk
    assert _rel(params, tree.unflatten(ref_p)) <= 1e-6


def test_clip_by_global_norm_matches_torch_and_logs_the_norm():
    g = _tree(3, scale=5.0)
    leaves = [torch.nn.Parameter(torch.zeros_like(x)) for x in tree.leaves(g)]
    for p, x in zip(leaves, tree.leaves(g)):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(leaves, 1.0)
    opt = optim.clip_by_global_norm(1.0)
    u, state = opt.update(g, opt.init(g))
    for a, p in zip(tree.leaves(u), leaves):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(optim.last_global_norm({"0": state}), total)
    torch.testing.assert_close(optim.global_norm(g), total)


def test_clip_by_value_matches_torch():
    g = _tree(4, scale=3.0)
    u, _ = optim.clip(0.5).update(g, {})
    for a, b in zip(tree.leaves(u), tree.leaves(g)):
        assert torch.equal(a, b.clamp(-0.5, 0.5))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("warmup, total, end", [(10, 100, 0.0), (0, 50, 0.0), (7, 7, 0.0), (20, 120, 1e-4)])
def test_warmup_cosine_equals_transformers_at_every_step(warmup, total, end):
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    peak = 3e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    if end:
        ref = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=end)
    else:
        ref = get_cosine_schedule_with_warmup(opt, warmup, total)
    sched = optim.warmup_cosine(peak, warmup, total, end_value=end)
    for step in range(total + 1):
        expected = ref.get_last_lr()[0]
        assert abs(sched(step) - expected) <= 1e-9, step
        assert abs(float(sched(torch.tensor(step))) - expected) <= 1e-9, step
        opt.step()
        ref.step()
    assert sched(total + 50) == pytest.approx(end, abs=1e-12)  # held after total_steps


def test_warmup_linear_equals_transformers():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_linear_schedule_with_warmup(opt, 5, 40)
    sched = optim.warmup_linear(1e-3, 5, 40)
    for step in range(45):
        assert abs(sched(step) - ref.get_last_lr()[0]) <= 1e-12, step
        opt.step()
        ref.step()


def test_simple_schedules_and_join():
    assert optim.constant(0.5)(7) == 0.5
    lin = optim.linear(1.0, 0.0, 10, transition_begin=2)
    assert [lin(s) for s in (0, 2, 7, 12, 30)] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    cos = optim.cosine_decay(1.0, 10, end_value=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1) and cos(5) == pytest.approx(0.55)
    j = optim.join([optim.constant(1.0), optim.linear(1.0, 0.0, 4), optim.constant(0.25)], [3, 7])
    assert [j(s) for s in (0, 2, 3, 5, 7, 100)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.25, 0.25])
    for s in (0, 3, 5, 9):
        assert float(j(torch.tensor(s))) == j(s)


@given(st.integers(0, 500))
def test_schedules_int_and_tensor_steps_agree(step):
    for sched in (optim.warmup_cosine(1e-3, 50, 300, 1e-5), optim.warmup_linear(1e-3, 50, 300),
                  optim.cosine_decay(1.0, 100), optim.linear(0.0, 1.0, 100)):
        out = sched(torch.tensor(step, dtype=torch.int64))
        assert isinstance(out, torch.Tensor) and out.dim() == 0
        assert float(out) == sched(step)


def test_schedule_under_compile_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cc = CompileCounter()
    sched = optim.warmup_cosine(1.0, 5, 20)
    f = torch.compile(lambda t: sched(t) * 2, backend=cc, fullgraph=True)
    for s in range(12):
        assert float(f(torch.tensor(s))) == pytest.approx(2 * sched(s), abs=1e-12)
    assert cc.frame_count == 1


# ----------------------------------------------------------------------------- wrappers


def test_multi_steps_equals_one_step_on_the_concatenated_batch():
    net = _mlp()
    loss = _loss_fn(net)
    k = 4
    for inner in (optim.sgd(0.1, momentum=0.9), optim.adamw(1e-2, weight_decay=0.1)):
        acc = optim.multi_steps(inner, k)
        p_micro = p_big = _params_of(net)
        s_micro, s_big = acc.init(p_micro), inner.init(p_big)
        for outer in range(2):
            for i in range(k):
                x, y = _batch(outer * k + i)
                u, s_micro = acc.update(grad(loss)(p_micro, x, y), s_micro, p_micro)
                if i < k - 1:
                    assert all(bool((v == 0).all()) for v in tree.leaves(u))
                p_micro = optim.apply_updates(p_micro, u)
            xb, yb = X[outer * k * 8 : (outer + 1) * k * 8], Y[outer * k * 8 : (outer + 1) * k * 8]
            u, s_big = inner.update(grad(loss)(p_big, xb, yb), s_big, p_big)
            p_big = optim.apply_updates(p_big, u)
            assert _rel(p_micro, p_big) <= 1e-5
        assert int(s_micro["mini_step"]) == 0


def test_apply_if_finite_skips_and_counts_nonfinite_steps():
    params = _tree(0)
    opt = optim.apply_if_finite(optim.adamw(1e-2), max_consecutive_errors=2)
    state = opt.init(params)
    u, state = opt.update(_tree(1), state, params)
    params = optim.apply_updates(params, u)
    bad = tree.flatten(_tree(2))
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"].clone()
    bad["blocks.0.attn.qkv.weight"][3, 1] = float("inf")
    before_inner = tree.flatten(state["inner"])
    for n in (1, 2):
        u, state = opt.update(tree.unflatten(bad), state, params)
        new_params = optim.apply_updates(params, u)
        assert all(torch.equal(a, b) for a, b in zip(tree.leaves(new_params), tree.leaves(params)))
        assert all(torch.equal(before_inner[k], v) for k, v in tree.flatten(state["inner"]).items())
        assert int(state["notfinite_count"]) == n and int(state["total_notfinite"]) == n
        assert not bool(state["last_finite"])
    u, state = opt.update(_tree(3), state, params)  # a good step resets the consecutive count
    assert int(state["notfinite_count"]) == 0 and int(state["total_notfinite"]) == 2
    assert int(state["inner"]["count"]) == 2
    bad["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    for _ in range(3):  # the third consecutive error exceeds max_consecutive_errors: applied
        u, state = opt.update(tree.unflatten(bad), state, params)
    assert int(state["inner"]["count"]) == 3


def test_loss_scale_backs_off_on_overflow_and_grows_after_good_steps():
    params = {"w": torch.ones(3)}
    opt = optim.dynamic_loss_scale(optim.sgd(0.1), init_scale=2.0**10, growth_interval=3)
    state = opt.init(params)
    assert float(optim.loss_scale(state)) == 1024.0
    loss = lambda p: (p["w"] ** 2).sum()
    g = grad(lambda p: optim.scale_loss(loss(p), state))(params)
    u, state = opt.update(g, state, params)
    torch.testing.assert_close(u["w"], -0.1 * 2 * params["w"])  # unscaled before the step
    u, state = opt.update({"w": torch.tensor([1.0, float("inf"), 0.0])}, state, params)
    assert float(optim.loss_scale(state)) == 512.0 and int(state["good_steps"]) == 0
    assert torch.equal(u["w"], torch.zeros(3))  # skipped
    for i in range(3):
        _, state = opt.update({"w": torch.ones(3)}, state, params)
    assert float(optim.loss_scale(state)) == 1024.0 and int(state["good_steps"]) == 0


def test_loss_scale_rule_matches_torch_amp_update_scale():
    flags = [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    scale_t, tracker = torch.tensor(8.0), torch.tensor(0, dtype=torch.int32)
    scale, good = torch.tensor(8.0), torch.tensor(0)
    for f in flags:
        torch._amp_update_scale_(scale_t, tracker, torch.tensor(float(f)), 2.0, 0.5, 3)
        scale, good = optim.update_loss_scale(scale, good, torch.tensor(not f), 2.0, 0.5, 3)
        assert float(scale) == float(scale_t) and int(good) == int(tracker)


def test_inject_hyperparams_exposes_the_learning_rate():
    sched = optim.warmup_cosine(1e-2, 3, 10)
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=sched, weight_decay=0.1, mask=optim.decay_rule)
    plain = optim.adamw(sched, weight_decay=0.1, mask=optim.decay_rule)
    params = p2 = _tree(0)
    state, s2 = opt.init(params), plain.init(params)
    assert float(optim.current_learning_rate(state)) == sched(0)
    for step in range(6):
        g = _tree(30 + step)
        u, state = opt.update(g, state, params)
        assert float(optim.current_learning_rate(state)) == pytest.approx(sched(step), abs=1e-15)
        assert state["hyperparams"]["weight_decay"].item() == pytest.approx(0.1)
        params = optim.apply_updates(params, u)
        u2, s2 = plain.update(g, s2, p2)
        p2 = optim.apply_updates(p2, u2)
    assert _rel(params, p2) <= 1e-6
    # a hand-edited numeric hyperparameter takes effect on the next update
    state["hyperparams"]["weight_decay"] = torch.tensor(0.0, dtype=torch.float64)
    _, state = opt.update(_tree(40), state, params)
    assert float(state["hyperparams"]["weight_decay"]) == 0.0
    with pytest.raises(ValueError, match="learning rate"):
        optim.current_learning_rate(plain.init(params))


def test_decay_mask_groups_by_name():
    params = {
        "embed": {"weight": torch.zeros(5, 4)},
        "pos": {"weight": torch.zeros(8, 4)},
        "blocks": {"0": {"attn": {"qkv": {"weight": torch.zeros(12, 4), "bias": torch.zeros(12)}},
                         "ln1": {"weight": torch.zeros(4), "bias": torch.zeros(4)},
                         "mlp": {"fc": {"weight": torch.zeros(16, 4), "bias": torch.zeros(16)}}}},
        "norm_f": {"weight": torch.zeros(4)},
        "ln_f": {"weight": torch.zeros(4)},
        "lm_head": {"weight": torch.zeros(5, 4)},
        "scale": torch.zeros(4),
    }
    flat = tree.flatten(optim.decay_mask(params))
    assert [k for k, v in flat.items() if v] == [
        "embed.weight", "pos.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight", "lm_head.weight"
    ]
    over = tree.flatten(optim.decay_mask(params, no_decay=["embed.*", "pos.*"], decay=["scale"]))
    assert not over["embed.weight"] and not over["pos.weight"] and over["scale"]
    assert optim.decay_rule("blocks.3.input_layernorm.weight", torch.zeros(4, 4)) is False


@given(st.floats(0.1, 3.0), st.floats(-2.0, 2.0), st.integers(0, 5))
def test_chain_composes(a, b, seed):
    g = _tree(seed)
    u1, _ = optim.chain(optim.scale(a), optim.scale(b)).update(g, {})
    u2, _ = optim.scale(a * b).update(g, {})
    for x, y in zip(tree.leaves(u1), tree.leaves(u2)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # associativity, with state: ((clip, trace), sgd-lr) == (clip, (trace, sgd-lr))
    t1 = optim.chain(optim.chain(optim.clip_by_global_norm(1.0), optim.trace(0.5)), optim.scale(-a))
    t2 = optim.chain(optim.clip_by_global_norm(1.0), optim.chain(optim.trace(0.5), optim.scale(-a)))
    s1, s2 = t1.init(g), t2.init(g)
    for i in range(3):
        gi = _tree(seed + i, scale=b)
        v1, s1 = t1.update(gi, s1)
        v2, s2 = t2.update(gi, s2)
        for x, y in zip(tree.leaves(v1), tree.leaves(v2)):
            assert torch.equal(x, y)


@given(st.integers(0, 2**6 - 1), st.integers(0, 5))
def test_masked_leaves_never_change(bits, seed):
    params = _tree(seed)
    sel = {n: bool(bits >> i & 1) for i, n in enumerate(tree.names(params))}
    mask = tree.unflatten(sel)
    # freeze: the selected params never move, the others do
    opt = optim.chain(optim.adamw(1e-1, weight_decay=0.5), optim.freeze(mask))
    p, s = params, opt.init(params)
    for i in range(3):
        u, s = opt.update(_tree(seed + 10 + i), s, p)
        p = optim.apply_updates(p, u)
    for n, v in tree.flatten(p).items():
        assert torch.equal(v, tree.flatten(params)[n]) == sel[n], n
    # masked: leaves outside the mask pass through the inner transformation untouched
    g = _tree(seed + 20)
    opt = optim.masked(optim.adamw(1e-1), tree.map(lambda x: not x, mask))
    u, s = opt.update(g, opt.init(params), params)
    for n, v in tree.flatten(u).items():
        assert torch.equal(v, tree.flatten(g)[n]) == sel[n], n
    assert tree.names(s["inner"]["mu"]) == [n for n in tree.names(params) if not sel[n]]


@given(st.floats(1e-3, 10.0), st.floats(1e-3, 1e3), st.integers(0, 5))
def test_clip_by_global_norm_bounds_the_norm(c, scale, seed):
    g = _tree(seed, scale=scale)
    opt = optim.clip_by_global_norm(c)
    u, state = opt.update(g, opt.init(g))
    norm = float(optim.global_norm(u))
    assert norm <= c * (1 + 1e-6)
    before = float(state["global_norm"])
    if before <= c:  # small gradients are left alone (up to the 1e-6 guard)
        for x, y in zip(tree.leaves(u), tree.leaves(g)):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=0)


def test_partition_applies_a_transformation_per_label():
    params = _tree(0)
    labels = lambda name, leaf: "frozen" if name.startswith("embed") else ("sgd" if leaf.dim() == 1 else "adam")
    opt = optim.partition({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.1), "frozen": optim.set_to_zero()}, labels)
    state = opt.init(params)
    g = _tree(1)
    u, state = opt.update(g, state, params)
    fu, fg = tree.flatten(u), tree.flatten(g)
    assert torch.equal(fu["embed.weight"], torch.zeros(6, 4))
    torch.testing.assert_close(fu["blocks.0.ln1.bias"], -0.1 * fg["blocks.0.ln1.bias"])
    torch.testing.assert_close(fu["lm_head.weight"], -1e-2 * torch.sign(fg["lm_head.weight"]), rtol=1e-5, atol=1e-9)
    assert set(state) == {"adam", "sgd", "frozen"}
    assert tree.names(state["adam"]["mu"]) == ["blocks.0.attn.qkv.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match="no transformation"):
        optim.partition({"adam": optim.adam()}, labels).init(params)


# ----------------------------------------------------------------------------- state, compile, vmap


def test_state_saves_and_loads_with_tree(tmp_path):
    params = _tree(0)
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.apply_if_finite(optim.inject_hyperparams(optim.adamw)(learning_rate=optim.warmup_cosine(1e-2, 2, 9)), 3))
    state = opt.init(params)
    for i in range(3):
        u, state = opt.update(_tree(i + 1), state, params)
        params = optim.apply_updates(params, u)
    tree.save(state, tmp_path / "opt.safetensors")
    loaded = tree.load(tmp_path / "opt.safetensors", like=state)
    for k, v in tree.flatten(state).items():
        assert torch.equal(tree.flatten(loaded)[k], v) and tree.flatten(loaded)[k].dtype == v.dtype
    assert tree.flatten(state)["1.inner.count"].dtype == torch.int64
    u1, _ = opt.update(_tree(9), state, params)
    u2, _ = opt.update(_tree(9), loaded, params)  # empty sub-states ({}) are not in the file
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(u1), tree.leaves(u2)))


def _compiled_steps(backend):
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

    torch._dynamo.reset()
    cc = CompileCounter() if backend == "eager" else CompileCounterWithBackend(backend)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(learning_rate=optim.warmup_cosine(1e-2, 3, 10), weight_decay=0.1,
                                              mask=optim.decay_rule),
    )

    def step(g, s, p):
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    compiled = torch.compile(step, backend=cc, fullgraph=True)
    p = pe = _tree(0)
    s = se = opt.init(p)
    counts = []
    for i in range(10):
        g = _tree(100 + i)
        p, s = compiled(g, s, p)
        pe, se = step(g, se, pe)
        counts.append(cc.frame_count)
    # one capture of the whole update (fullgraph), no recompile as the step counter and lr change
    # (a backend such as aot_eager may count an extra frame inside that first compile)
    assert counts == [counts[0]] * 10
    if backend == "eager":
        assert counts[0] == 1
    assert _rel(p, pe) <= 1e-5
    assert float(optim.current_learning_rate(s)) == pytest.approx(optim.warmup_cosine(1e-2, 3, 10)(9))


def test_update_compiles_once_over_10_steps():
    _compiled_steps("eager")


def test_update_compiles_once_over_10_steps_aot_eager():
    _compiled_steps("aot_eager")


@pytest.mark.slow
def test_update_compiles_once_over_10_steps_inductor():
    _compiled_steps("inductor")


def test_vmap_over_an_ensemble_updates_each_member():
    members = [_tree(i) for i in range(3)]
    grads = [_tree(10 + i) for i in range(3)]
    stack = lambda ts: tree.map(lambda *xs: torch.stack(xs), *ts)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1, mask=optim.decay_rule))

    def step(p, g, s):
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    ps, gs = stack(members), stack(grads)
    ss = vmap(opt.init)(ps)
    for _ in range(3):
        ps, ss = vmap(step)(ps, gs, ss)
    for i in range(3):
        p, s = members[i], opt.init(members[i])
        for _ in range(3):
            p, s = step(p, grads[i], s)
        assert _rel(tree.map(lambda x: x[i], ps), p) <= 1e-6
        assert int(ss["1"]["count"][i]) == 3


def test_apply_updates_is_out_of_place_and_keeps_dtype():
    params = {"a": torch.ones(3, dtype=torch.float16), "b": torch.ones(2)}
    updates = {"a": torch.full((3,), 0.5), "b": torch.full((2,), -1.0)}
    out = optim.apply_updates(params, updates)
    assert out["a"].dtype == torch.float16 and torch.equal(out["a"], torch.full((3,), 1.5, dtype=torch.float16))
    assert torch.equal(params["a"], torch.ones(3, dtype=torch.float16)) and torch.equal(out["b"], torch.zeros(2))


def test_update_does_not_write_into_its_inputs():
    params, grads = _tree(0), _tree(1)
    for opt in (optim.adamw(1e-2), optim.adamw(1e-2, fused=False), optim.sgd(0.1, momentum=0.9), optim.lion()):
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
        snap = [x.clone() for x in tree.leaves(state) + tree.leaves(params) + tree.leaves(grads)]
        opt.update(grads, state, params)
        now = tree.leaves(state) + tree.leaves(params) + tree.leaves(grads)
        assert all(torch.equal(a, b) for a, b in zip(snap, now))


# ----------------------------------------------------------------------------- bad input


def test_mismatched_trees_list_the_keys():
    params = _tree(0)
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    grads = tree.flatten(_tree(1))
    del grads["lm_head.weight"]
    grads["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"only in grads: extra.weight; only in adam state 'mu': lm_head.weight"):
        opt.update(tree.unflatten(grads), state, params)
    with pytest.raises(ValueError, match=r"params and grads have different keys; only in grads: lm_head.weight"):
        p = tree.flatten(params)
        del p["lm_head.weight"]
        opt.update(_tree(1), state, tree.unflatten(p))
    with pytest.raises(ValueError, match="updates and params have different keys"):
        optim.apply_updates(params, tree.unflatten(grads))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.adamw(-1e-3), "learning_rate must be a finite number >= 0, got -0.001"),
        (lambda: optim.sgd(-0.1), "learning_rate"),
        (lambda: optim.adam(1e-3, b1=1.0), r"b1 must be a finite number in \[0, 1\), got 1.0"),
        (lambda: optim.adamw(1e-3, b2=-0.1), r"b2 must be a finite number in \[0, 1\)"),
        (lambda: optim.lion(1e-4, b1=1.5), "b1"),
        (lambda: optim.sgd(0.1, momentum=1.2), "momentum"),
        (lambda: optim.adamw(1e-3, weight_decay=-1.0), "weight_decay"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov"),
        (lambda: optim.multi_steps(optim.sgd(0.1), 0), "every_k"),
        (lambda: optim.warmup_cosine(1e-3, 10, 5), "total_steps"),
        (lambda: optim.join([optim.constant(1.0)], [3]), "len"),
        (lambda: optim.dynamic_loss_scale(optim.sgd(0.1), backoff_factor=2.0), "backoff_factor"),
        # a bool is no number: init_scale=True used to pass as a scale of 1
        (lambda: optim.dynamic_loss_scale(optim.sgd(0.1), init_scale=True), "init_scale must be a finite number > 0, got True"),
        (lambda: optim.dynamic_loss_scale(optim.sgd(0.1), growth_factor=1.0), "growth_factor"),
        (lambda: optim.dynamic_loss_scale(optim.sgd(0.1), backoff_factor=False), "backoff_factor"),
    ],
)
def test_bad_hyperparameters_raise_valueerror(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_raise_typeerror():
    with pytest.raises(TypeError, match="chain argument 1 must be a GradientTransformation"):
        optim.chain(optim.scale(1.0), "adam")
    with pytest.raises(TypeError, match="learning_rate"):
        optim.adamw("0.1")
    with pytest.raises(TypeError, match="step"):
        optim.constant(1.0)("3")


def test_skip_and_accumulate_choose_per_member_under_vmap():
    # under vmap the branch becomes a leafwise torch.where: each member skips or steps alone
    params = {"w": torch.zeros(3, 2)}
    grads = {"w": torch.ones(3, 2)}
    grads["w"][1, 0] = float("inf")
    opt = optim.apply_if_finite(optim.sgd(0.5), 3)
    u, s = vmap(lambda g, s, p: opt.update(g, s, p))(grads, vmap(opt.init)(params), params)
    assert torch.equal(u["w"][0], torch.full((2,), -0.5)) and torch.equal(u["w"][1], torch.zeros(2))
    assert s["notfinite_count"].tolist() == [0, 1, 0]
    acc = optim.multi_steps(optim.sgd(1.0), 2)
    s = vmap(acc.init)(params)
    g = {"w": torch.arange(6.0).reshape(3, 2)}
    u, s = vmap(acc.update)(g, s, params)
    assert torch.equal(u["w"], torch.zeros(3, 2)) and s["mini_step"].tolist() == [1, 1, 1]
    u, s = vmap(acc.update)(g, s, params)
    assert torch.equal(u["w"], -g["w"]) and s["mini_step"].tolist() == [0, 0, 0]
