"""per_sample behaviours the suite did not check (found by mutation testing, second round): the
ghost route's default chunk rule, empty batches of ``norms`` / ``losses``, a tied weight whose
linear use comes before its lookup, a weight that is both a factor weight and a norm's affine
weight on the batched route, the group-norm bias formula and the bias shape of each use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aam_func import per_sample
from aam_func.per_sample import ghost
from aam_func.intercept import Use
from aam_func.per_sample.factors import bias_grad, feature_shape
from aam_func.per_sample.ghost import Discovery, GhostUse


def _discovery(*elements_per_use):
    uses = tuple(GhostUse(f"w{i}", "linear", (1, n), torch.float32) for i, n in enumerate(elements_per_use))
    names = frozenset(u.name for u in uses)
    return Discovery(uses, frozenset(), names, uses)


def _params(n):
    return {"w": torch.empty(n, device="meta")}  # only its size is read


@pytest.mark.parametrize(
    "outputs, n_params, B, want",
    [
        # the whole batch's work (4 x outputs per example) fits in GHOST_CHUNK_ELEMENTS: one chunk
        ((10,), 100, 1000, 1000),
        ((8, 2), 100, 1000, 1000),
        # 4 * 2^16 elements per example: 2^24 // 2^18 = 64 examples per chunk (the fraction
        # 0.15 * 1000 * 1000 / 2^18 rounds to 0, under it)
        ((1 << 16,), 1000, 1000, 64),
        ((1 << 15, 1 << 15), 1000, 1000, 64),
        # the result is as large as the work: 0.15 of the batch, 150 > 64
        ((1 << 16,), 1 << 18, 1000, 150),
        # 4 * 2^22 elements per example: at least GHOST_MIN_CHUNK = 2 examples
        ((1 << 22,), 100, 1000, 2),
        # never more than the batch
        ((1 << 22,), 100, 1, 1),
        ((10,), 100, 7, 7),
        # 2^24 / (4 * 3 * 2^14) = 85.3: whole examples, 85
        ((3 << 14,), 1000, 1000, 85),
        # no recorded use: the work counts as one element per example (no division by zero)
        ((), 1, 1 << 24, 1 << 24),
    ],
)
def test_the_ghost_routes_default_chunk_rule(outputs, n_params, B, want):
    """``chunk_size=None`` on the ghost route: per-example work estimated as four times the
    recorded uses' outputs; a chunk of GHOST_CHUNK_FRACTION (0.15) of the batch times the
    result-to-work ratio, at least GHOST_MIN_CHUNK (2) examples, and no split of a batch whose
    work fits in GHOST_CHUNK_ELEMENTS (2^24 elements, 64 MiB of float32), capped at B."""
    assert (ghost.GHOST_CHUNK_FRACTION, ghost.GHOST_MIN_CHUNK, ghost.GHOST_CHUNK_ELEMENTS) == (0.15, 2, 1 << 24)
    per = max(1, 4 * sum(outputs))
    rule = max(1, min(B, max(2, int(0.15 * B * n_params / per), (1 << 24) // per)))
    assert rule == want
    got = ghost._ghost_chunk(_discovery(*outputs), _params(n_params), B)
    assert got == want and isinstance(got, int)


def test_a_small_models_batch_runs_as_one_ghost_pass():
    """A batch whose work fits in GHOST_CHUNK_ELEMENTS is not split: the loss runs twice (the
    discovery on the first example, then one vmapped pass over all B), and the gradients are
    the exact route's."""
    calls = []

    def loss(p, x):
        calls.append(x.shape)
        return F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"]).pow(2).sum()

    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(5, 3, generator=g, dtype=torch.float64),
              "b1": torch.randn(5, generator=g, dtype=torch.float64),
              "w2": torch.randn(2, 5, generator=g, dtype=torch.float64)}
    x = torch.randn(9, 4, 3, generator=g, dtype=torch.float64)
    got = per_sample.grads(loss, params, x, method="ghost")
    assert len(calls) == 2
    want = per_sample.grads(loss, params, x, method="vmap")
    for k in params:
        torch.testing.assert_close(got[k], want[k])


def test_norms_and_losses_of_an_empty_batch_are_empty():
    """A Poisson-sampled batch may be empty: its per-example norms and losses are (0,) vectors,
    on every route, as clipped_sum's (whose sum is zeros)."""
    params = {"w": torch.ones(2, 3)}

    def loss(p, x):
        return F.linear(x, p["w"]).sum(1)  # (B,) per-example losses: every route takes it

    empty = torch.zeros(0, 3)
    for method in per_sample.METHODS:
        n = per_sample.norms(loss, params, empty, method=method)
        assert n.shape == (0,)
    assert per_sample.losses(loss, params, empty).shape == (0,)
    c = per_sample.clipped_sum(loss, params, empty, 1.0)
    assert c.norms.shape == (0,) and c.losses.shape == (0,)
    assert torch.equal(c.sum["w"], torch.zeros(2, 3))
    one = torch.ones(1, 3)  # and a batch of one is not empty: ‖x ⊗ 1‖ over the (2, 3) weight
    for method in per_sample.METHODS:
        torch.testing.assert_close(per_sample.norms(loss, params, one, method=method), torch.tensor([math.sqrt(6.0)]))
    torch.testing.assert_close(per_sample.losses(loss, params, one), torch.tensor([6.0]))


def test_a_tied_weight_used_as_a_head_before_its_lookup():
    """Ghost norms and clipped sums of a weight read first by ``F.linear`` and then by
    ``F.embedding`` (the cross term of a dense use with a lookup, in that order) equal the
    exact route's."""
    g = torch.Generator().manual_seed(0)
    B, V, d, T = 3, 6, 4, 5
    params = {"E": torch.randn(V, d, generator=g, dtype=torch.float64)}
    batch = {"h": torch.randn(B, T, d, generator=g, dtype=torch.float64), "ids": torch.randint(0, V, (B, T), generator=g)}

    def loss(p, b):
        logits = F.linear(b["h"], p["E"])  # the head first ...
        e = F.embedding(b["ids"], p["E"])  # ... then the lookup of the same table
        return logits.logsumexp(-1).sum() + (e.pow(3) * b["h"]).sum()  # (not a function of h·h: no symmetry)

    want = per_sample.clipped_sum(loss, params, batch, 5.0, method="vmap")
    got = per_sample.clipped_sum(loss, params, batch, 5.0, method="ghost")
    torch.testing.assert_close(got.norms, want.norms)
    torch.testing.assert_close(got.sum["E"], want.sum["E"], rtol=1e-5, atol=1e-6)  # float32 norms in the factors
    assert bool((want.norms > 5.0).any() and (want.norms < 100.0).all())  # some clipped, cross terms matter
    torch.testing.assert_close(per_sample.norms(loss, params, batch, method="ghost"), want.norms)


def test_batched_route_with_a_weight_that_is_also_a_norms_affine_weight():
    """On the batched route a weight with factor uses (``F.linear``) and a norm use (the affine
    weight of ``F.layer_norm``) gets its per-example gradient formed once per chunk and added to
    the norm's part; norms and clipped sums equal the exact route's, chunk by chunk."""
    g = torch.Generator().manual_seed(0)
    params = {"W": torch.randn(4, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(4, generator=g, dtype=torch.float64)}
    x = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)

    def loss(p, x):
        h = F.linear(x, p["W"], p["b"])
        return F.layer_norm(torch.tanh(h), (4, 4), weight=p["W"]).pow(3).sum((1, 2))

    want = per_sample.clipped_sum(loss, params, x, 30.0, method="vmap")
    for chunk in (2, 5):
        got = per_sample.clipped_sum(loss, params, x, 30.0, method="batched", chunk_size=chunk)
        torch.testing.assert_close(got.norms, want.norms)
        for k in params:
            torch.testing.assert_close(got.sum[k], want.sum[k])
    assert bool((want.norms > 30.0).any() and (want.norms < 30.0).any())


def test_group_norm_bias_grad_is_the_output_gradient_summed_per_channel():
    """``bias_grad("group_norm", ...)`` on the (B, 1, C, *spatial) layout: example i's gradient of
    ``F.group_norm``'s bias, by autograd on that example alone."""
    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 3, 4, 2, 2, 3
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    up = torch.randn(B, 1, C, H, W, generator=g, dtype=torch.float64)
    got = bias_grad("group_norm", None, up, {"num_groups": G, "eps": 1e-5})
    assert got.shape == (B, C)
    for i in range(B):
        b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
        out = F.group_norm(x[i:i + 1], G, torch.ones(C, dtype=torch.float64), b)
        (want,) = torch.autograd.grad((out * up[i]).sum(), b)
        torch.testing.assert_close(got[i], want)
    assert math.prod(got.shape) == B * C


def test_feature_shape_is_the_shape_of_the_bias_each_use_adds():
    """``feature_shape(use, out)``: the shape of the bias the recognised op adds to ``out``, the
    op's own bias argument: a linear's / addmm's output features, a conv's output channels (dim
    -(nd+1)), a group norm's channels (dim 1), a layer norm's normalized_shape."""
    z = torch.zeros
    cases = [  # (use, the op's output with its bias, that bias)
        (Use("linear", "w", z(5, 3), z(2, 7, 3)), F.linear(z(2, 7, 3), z(5, 3), z(5)), z(5)),
        (Use("addmm", "w", z(3, 5), z(14, 3)), torch.addmm(z(5), z(14, 3), z(3, 5)), z(5)),
        (Use("conv", "w", z(6, 2, 3), z(2, 2, 8)), F.conv1d(z(2, 2, 8), z(6, 2, 3), z(6)), z(6)),
        (Use("conv", "w", z(6, 2, 3, 3), z(2, 2, 7, 6)), F.conv2d(z(2, 2, 7, 6), z(6, 2, 3, 3), z(6)), z(6)),
        (Use("group_norm", "w", z(6), z(2, 6, 5), options={"num_groups": 3, "eps": 1e-5}),
         F.group_norm(z(2, 6, 5), 3, None, z(6)), z(6)),
        (Use("layer_norm", "w", z(4, 5), z(3, 4, 5), options={"normalized_shape": (4, 5), "eps": 1e-5}),
         F.layer_norm(z(3, 4, 5), (4, 5), None, z(4, 5)), z(4, 5)),
        (Use("layer_norm", "w", z(5), z(3, 4, 5), options={"normalized_shape": 5, "eps": 1e-5}),
         F.layer_norm(z(3, 4, 5), (5,), None, z(5)), z(5)),
    ]
    for use, out, bias in cases:
        assert feature_shape(use, out) == tuple(bias.shape), use.kind


def test_batched_grads_in_every_chunking_equal_the_exact_ones():
    """``grads(method="batched", chunk_size=c)`` writes each chunk's rows of the result (only a
    single chunk covering the whole batch skips the slicing), for every c."""
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    x = torch.randn(6, 2, 4, generator=g, dtype=torch.float64)

    def loss(p, x):
        return torch.tanh(F.linear(x, p["w"], p["b"])).pow(2).sum((1, 2))

    want = per_sample.grads(loss, params, x, method="vmap")
    for chunk in (1, 2, 3, 4, 6, 7):
        got = per_sample.grads(loss, params, x, method="batched", chunk_size=chunk)
        for k in params:
            torch.testing.assert_close(got[k], want[k], msg=lambda m: f"chunk_size={chunk}, {k}: {m}")


def test_batched_route_when_the_losses_do_not_depend_differentiably_on_the_params():
    """A loss that reads the params only through a detached output has zero per-example
    gradients and norms on the batched route, as on the exact one (no backward is attempted
    through losses that do not require grad)."""
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}
    x = torch.randn(5, 4, generator=g)

    def loss(p, x):
        return F.linear(x, p["w"], p["b"]).detach().pow(2).sum(1) + x.sum(1)

    for method in ("batched", "vmap"):
        got = per_sample.grads(loss, params, x, method=method)
        assert all(torch.equal(got[k], torch.zeros((5,) + params[k].shape)) for k in params)
    c = per_sample.clipped_sum(loss, params, x, 1.0, method="batched")
    assert torch.equal(c.norms, torch.zeros(5))
    torch.testing.assert_close(c.losses, loss(params, x))


def test_adaptive_clipping_default_count_noise_is_a_twentieth_of_the_batch():
    """Andrew et al.'s default σ_b = expected_batch_size / 20: the gradient keeps the multiplier
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½) of it, and an explicit count_noise of that value is the same."""
    from aam_func.per_sample import clipping

    t = clipping.adaptive(1.0, expected_batch_size=200)
    assert t.gradient_noise(1.0) == pytest.approx((1.0 - 20.0**-2) ** -0.5, rel=1e-12)
    assert t.gradient_noise(1.0) == clipping.adaptive(1.0, expected_batch_size=200, count_noise=10.0).gradient_noise(1.0)
    assert clipping.DEFAULT_CLIP_LEARNING_RATE == 0.2


def test_dp_aggregate_draws_fresh_noise_at_every_step():
    """The noise generator is seeded by (seed, step count): every step's noise is a new draw (no
    two of 32 steps alike), and the same state gives the same noise again."""
    t = per_sample.dp_aggregate(1.0, 1.0, seed=3)
    grads = {"w": torch.zeros(2, 4)}
    state = t.init({"w": torch.zeros(4)})
    seen = []
    for _ in range(32):
        again, _ = t.update(grads, state)
        out, state = t.update(grads, state)
        assert torch.equal(again["w"], out["w"])
        seen.append(tuple(out["w"].tolist()))
    assert len(set(seen)) == 32


def test_poisson_sample_takes_u_below_the_rate():
    """Example i joins when its uniform draw u_i < q (so P = q exactly for u on [0, 1)): a draw
    equal to q stays out."""
    u = torch.rand(10, generator=torch.Generator().manual_seed(4))
    q = float(u[3])
    got = per_sample.poisson_sample(10, q, generator=torch.Generator().manual_seed(4))
    assert got.tolist() == [i for i in range(10) if float(u[i]) < q]
    assert 3 not in got.tolist()


def test_adaptive_gradient_noise_needs_count_noise_above_half_sigma():
    """σ_b must exceed σ/2 strictly: at σ_b = σ/2 the count takes the whole budget (σ_Δ would be
    infinite), refused with the bound named; just above, σ_Δ is finite and large."""
    from aam_func.per_sample.clipping import adaptive_gradient_noise

    for sigma in (1.0, 3.0):
        with pytest.raises(ValueError, match="count_noise must exceed noise_multiplier / 2"):
            adaptive_gradient_noise(sigma, sigma / 2)
        assert adaptive_gradient_noise(sigma, sigma / 2 * (1 + 1e-6)) > 100 * sigma
    assert adaptive_gradient_noise(0.0, 0.1) == 0.0


def test_batched_norms_in_chunks_of_a_model_with_factor_weights_only():
    """With no bias or norm weight (no materialised per-example gradient at all) the batched
    route's chunks still give one norm per example of the chunk, equal to the exact route's."""
    g = torch.Generator().manual_seed(5)
    params = {"w1": torch.randn(4, 3, generator=g, dtype=torch.float64), "w2": torch.randn(2, 4, generator=g, dtype=torch.float64)}
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def loss(p, x):
        return F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"]).pow(2).sum(1)

    want = per_sample.clipped_sum(loss, params, x, 1.0, method="vmap")
    for chunk in (2, 3):
        got = per_sample.clipped_sum(loss, params, x, 1.0, method="batched", chunk_size=chunk)
        torch.testing.assert_close(got.norms, want.norms)
        for k in params:
            torch.testing.assert_close(got.sum[k], want.sum[k])


def test_quantile_step_is_the_geometric_update_with_the_generators_draw():
    """C·exp(−η(b̃ − γ)), b̃ = (below + σ_b z)/n + ½ with z the generator's first standard normal
    draw (float64); with σ_b = 0 (a run without privacy for the count) b̃ = below/n + ½, no draw."""
    from aam_func.per_sample.clipping import quantile_step

    C, below, gamma, eta, n = 2.0, 3.0, 0.7, 0.2, 10.0
    g = torch.Generator().manual_seed(6)
    got = quantile_step(C, below, gamma, eta, 0.0, n, g)
    assert got == pytest.approx(C * math.exp(-eta * (below / n + 0.5 - gamma)), rel=1e-12)
    z = float(torch.randn((), generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    for sb in (4.0, 0.5):  # any σ_b > 0 draws, a small one too
        got = quantile_step(C, below, gamma, eta, sb, n, torch.Generator().manual_seed(6))
        assert got == pytest.approx(C * math.exp(-eta * ((below + sb * z) / n + 0.5 - gamma)), rel=1e-12)


def test_adaptive_clipping_draws_fresh_count_noise_at_every_step():
    """The count's noise generator is seeded by (seed, step count): from one clip norm and the
    same gradients, 32 different step counts give 32 different next norms; the same state gives
    the same one again."""
    from aam_func.per_sample import clipping

    t = clipping.adaptive(1.0, expected_batch_size=4, seed=7)
    per_ex = {"w": torch.arange(12.0).reshape(4, 3) / 10}
    nxt = set()
    for count in range(32):
        state = {"max_norm": torch.tensor(1.0, dtype=torch.float64), "count": torch.tensor(count)}
        _, s1 = t.update(per_ex, state)
        _, s2 = t.update(per_ex, state)
        assert float(s1["max_norm"]) == float(s2["max_norm"]) and int(s1["count"]) == count + 1
        nxt.add(float(s1["max_norm"]))
    assert len(nxt) == 32


def test_auto_route_choice(monkeypatch):
    """``method="auto"``: the ghost route when some weight is used only by a recognised op, else
    the vmap route; ``method="ghost"`` is honoured even with no such weight. Same gradients."""
    from aam_func.per_sample import route

    ran = []
    for name in ("ghost_grads", "vmap_grads"):
        real = getattr(route, name)
        monkeypatch.setattr(route, name, lambda *a, _real=real, _name=name, **k: (ran.append(_name), _real(*a, **k))[1])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    lin = {"w": torch.randn(2, 4, generator=g, dtype=torch.float64)}
    elementwise = {"s": torch.randn(4, generator=g, dtype=torch.float64)}

    def linear_loss(p, x):
        return torch.tanh(F.linear(x, p["w"])).sum()

    def scale_loss(p, x):
        return torch.tanh(x * p["s"]).pow(2).sum()

    cases = [(linear_loss, lin, "auto", "ghost_grads"), (scale_loss, elementwise, "auto", "vmap_grads"),
             (scale_loss, elementwise, "ghost", "ghost_grads")]
    for loss, params, method, want in cases:
        ran.clear()
        got = per_sample.grads(loss, params, x, method=method)
        assert ran == [want], (method, ran)
        exact = per_sample.grads(loss, params, x, method="vmap")
        for k in params:
            torch.testing.assert_close(got[k], exact[k])


def test_batched_route_refuses_lookups_and_convolutions_it_has_no_formula_for():
    """An embedding with scale_grad_by_freq (or max_norm) and a grouped convolution are refused
    by name on the batched route, each with its own reason."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 5, (3, 4), generator=g)
    table = {"E": torch.randn(5, 2, generator=g)}
    with pytest.raises(per_sample.BatchedUnsupported, match=r"'E'.*an embedding with max_norm / scale_grad_by_freq"):
        per_sample.grads(lambda p, i: F.embedding(i, p["E"], scale_grad_by_freq=True).sum((1, 2)), table, ids,
                         method="batched")
    conv = {"K": torch.randn(4, 1, 3, generator=g)}
    x = torch.randn(3, 2, 6, generator=g)
    with pytest.raises(per_sample.BatchedUnsupported, match=r"'K'.*a grouped convolution"):
        per_sample.grads(lambda p, x: F.conv1d(x, p["K"], groups=2).sum((1, 2)), conv, x, method="batched")


def test_batch_norm_with_running_statistics_is_allowed_when_training_is_not_passed():
    """``F.batch_norm``'s ``training`` defaults to False (running statistics: a per-channel affine
    map, no mixing of examples): a call that leaves it out is allowed on every route, and a
    training-mode call is refused naming the layer."""
    g = torch.Generator().manual_seed(10)
    params = {"bn": {"weight": torch.randn(3, generator=g), "bias": torch.randn(3, generator=g)},
              "w": torch.randn(3, 3, generator=g)}
    mean, var = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    x = torch.randn(4, 3, generator=g)

    def loss(p, x, training=None):
        h = F.linear(x, p["w"])
        if training is None:
            h = F.batch_norm(h, mean, var, p["bn"]["weight"], p["bn"]["bias"])
        else:
            h = F.batch_norm(h, mean, var, p["bn"]["weight"], p["bn"]["bias"], training)
        return torch.tanh(h).pow(2).sum()

    want = per_sample.grads(lambda p, x: loss(p, x, False), params, x, method="vmap")
    for method in ("vmap", "ghost"):
        got = per_sample.grads(loss, params, x, method=method)
        torch.testing.assert_close(got["bn"]["weight"], want["bn"]["weight"])
        torch.testing.assert_close(got["w"], want["w"])
    with pytest.raises(ValueError, match="BatchNorm layer 'bn'"):
        per_sample.grads(lambda p, x: loss(p, x, True), params, x, method="vmap")


def test_bias_grad_sums_over_every_position_the_bias_is_broadcast_to():
    """``bias_grad`` of a conv (``nd`` spatial dims) and of a linear use: example i's output
    gradient summed over all but the feature (channel) dim, whatever the positions in front of
    the features (a (B, n, out, *spatial) gradient sums over n too)."""
    g = torch.Generator().manual_seed(11)
    B, n, out, H, W = 2, 3, 4, 2, 5
    g2 = torch.randn(B, n, out, H, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bias_grad("conv", None, g2, {}, 2), g2.sum((1, 3, 4)))
    g1 = torch.randn(B, out, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bias_grad("conv", None, g1, {}, 1), g1.sum(2))
    gl = torch.randn(B, n, H, out, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bias_grad("linear", None, gl, {}), gl.sum((1, 2)))


def test_gradients_for_params_and_inputs_come_back_in_argnums_order_and_structure():
    """``argnums`` a tuple: one result per entry, in its order; the params' gradients (entry 0)
    in the caller's (nested) structure wherever 0 stands, the example's as the batch."""
    g = torch.Generator().manual_seed(12)
    params = {"enc": {"w": torch.randn(3, generator=g, dtype=torch.float64)}}
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def loss(p, x):
        return (p["enc"]["w"] * x).tanh().sum()

    gp = per_sample.grads(loss, params, x)
    gx = per_sample.grads(loss, params, x, argnums=1)
    assert set(gp) == {"enc"} and gx.shape == (4, 3)
    for argnums in ((0, 1), (1, 0)):
        out = per_sample.grads(loss, params, x, argnums=argnums)
        assert isinstance(out, tuple) and len(out) == 2
        for a, o in zip(argnums, out):
            if a == 0:
                assert set(o) == {"enc"} and set(o["enc"]) == {"w"}
                torch.testing.assert_close(o["enc"]["w"], gp["enc"]["w"])
            else:
                torch.testing.assert_close(o, gx)


def test_dp_aggregate_of_an_empty_batch_is_the_noise_over_the_expected_size():
    """A Poisson-sampled batch may be empty: the clipped sum is zeros of each param's shape, so
    the update is the noise alone divided by the expected batch size (σ = 0: exact zeros)."""
    grads = {"w": torch.zeros(0, 2, 3), "b": torch.zeros(0, 2)}
    t = per_sample.dp_aggregate(1.0, 0.0, expected_batch_size=8.0)
    out, _ = t.update(grads, t.init({"w": torch.zeros(2, 3), "b": torch.zeros(2)}))
    assert torch.equal(out["w"], torch.zeros(2, 3)) and torch.equal(out["b"], torch.zeros(2))
    t = per_sample.dp_aggregate(2.0, 1.0, expected_batch_size=8.0)
    out, _ = t.update(grads, t.init({}))
    assert out["w"].shape == (2, 3) and out["b"].shape == (2,) and bool((out["w"] != 0).all())


def test_dp_sgd_needs_a_generator_for_any_positive_noise():
    """Any σ > 0 (a small one too) needs an explicit generator; σ = 0 runs without one."""
    from aam_func import optim

    params = {"w": torch.zeros(3)}
    x = torch.ones(2, 3)

    def loss(p, x):
        return F.linear(x, p["w"][None]).pow(2).sum() + (p["w"] * x).sum()

    opt = optim.sgd(learning_rate=0.1)
    for sigma in (0.5, 2.0):
        step = per_sample.dp_sgd(loss, opt, max_norm=1.0, noise_multiplier=sigma)
        with pytest.raises(ValueError, match="needs an explicit torch.Generator"):
            step(params, opt.init(params), x)
    step = per_sample.dp_sgd(loss, opt, max_norm=1.0, noise_multiplier=0.0)
    new, _, info = step(params, opt.init(params), x)
    assert info.batch_size == 2 and new["w"].shape == (3,)


def test_count_below_counts_a_norm_equal_to_the_bound_as_unclipped():
    """Σ_i (1[‖g_i‖ ≤ C] − ½): an example exactly at C is not clipped (w_i = 1 up to the 1e-6)."""
    from aam_func.per_sample.clipping import count_below

    assert count_below(torch.tensor([1.0, 2.0, 3.0]), 2.0) == 2 - 1.5
    assert count_below(torch.tensor([2.0]), 2.0) == 0.5
    assert count_below(torch.tensor([2.5]), 2.0) == -0.5


def test_batched_route_refuses_a_use_with_no_batch_dimension():
    """A recognised use whose output is 0-d (a 1-D weight dotted with a flattened input) has no
    example index: refused by name even when B = 1."""
    params = {"v": torch.ones(3)}

    def loss(p, x):
        return F.linear(x.reshape(-1), p["v"]).reshape(1)

    with pytest.raises(per_sample.BatchedUnsupported, match=r"linear\('v'\) gives an output of shape \(\)"):
        per_sample.grads(loss, params, torch.ones(1, 3), method="batched")


def test_batched_route_adds_the_contributions_of_a_bias_shared_by_two_layers():
    """A bias used by two linear uses gets the sum of both uses' per-example gradients."""
    g = torch.Generator().manual_seed(14)
    params = {"w1": torch.randn(3, 3, generator=g, dtype=torch.float64), "w2": torch.randn(3, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def loss(p, x):
        h = torch.tanh(F.linear(x, p["w1"], p["b"]))
        return F.linear(h, p["w2"], p["b"]).pow(2).sum(1)

    want = per_sample.grads(loss, params, x, method="vmap")
    got = per_sample.grads(loss, params, x, method="batched")
    for k in params:
        torch.testing.assert_close(got[k], want[k])


def test_discovery_is_an_immutable_record():
    """What discovery found is a frozen value: it cannot be changed after the fact (the ghost pass
    and its chunks all read the same one), and equal findings compare equal."""
    import dataclasses

    params = {"w": torch.ones(2, 3)}

    def loss(p, x):
        return F.linear(x, p["w"]).sum()

    d = ghost.discover(loss, params, torch.ones(4, 3))
    assert d.ghost == frozenset({"w"}) and [u.name for u in d.ghost_uses] == ["w"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.ghost = frozenset()
    assert d == ghost.discover(loss, params, torch.ones(4, 3))


def test_clip_factor_is_opacus_min_one_c_over_norm_plus_1e_6():
    """w_i = min(1, C / (‖g_i‖ + 1e-6)) (Opacus's constant): an example exactly at C is scaled
    by C/(C + 1e-6), just under 1, so ‖w_i g_i‖ < C; a small one is kept whole."""
    assert per_sample.CLIP_EPS == 1e-6
    norms = torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64)
    w = per_sample.clip_factors(norms, 2.0)
    torch.testing.assert_close(w, torch.tensor([2.0 / (2.0 + 1e-6), 1.0, 2.0 / (4.0 + 1e-6)], dtype=torch.float64),
                               rtol=1e-15, atol=0)


def test_a_loss_that_is_not_one_number_per_example_is_refused_by_name():
    """per_sample.losses promises (B,) losses; a loss_fn returning a vector per example is refused
    by name on every route instead of coming back as (B, k) or failing inside a reshape."""
    from aam_func import per_sample

    params = {"w": torch.randn(3, 2, dtype=torch.float64)}
    batch = torch.randn(4, 3, dtype=torch.float64)
    vector = lambda p, x: (x @ p["w"]).pow(2).sum(0)  # noqa: E731 - shape (2,) per example
    for call in (lambda: per_sample.losses(vector, params, batch),
                 lambda: per_sample.grads(vector, params, batch, method="vmap")):
        with pytest.raises(ValueError, match=r"loss_fn must return one loss per example.*\(2,\)"):
            call()
    scalar = lambda p, x: (x @ p["w"]).pow(2).sum()  # noqa: E731
    one = lambda p, x: (x @ p["w"]).pow(2).sum(-1)  # noqa: E731 - shape (1,) on one example
    torch.testing.assert_close(per_sample.losses(scalar, params, batch), per_sample.losses(one, params, batch))
    assert per_sample.losses(one, params, batch).shape == (4,)
