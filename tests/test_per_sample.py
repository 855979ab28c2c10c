"""Per-example gradients, norms, clipped sums (vmap and ghost routes), DP-SGD, attribution."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import aam_func as af
from aam_func import optim, per_sample as ps, tree

B, T, V = 5, 10, 61


def tiny(**over):
    kw = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0, attention_backend="math")
    kw.update(over)
    model = af.Transformer(af.ModelConfig(**kw))
    return model, model.init(seed=0)


def lm_batch(seed=0, n=B, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if pad and n > 1:
        mask[1, 6:] = 0  # a padded example: its loss averages fewer tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def lm_loss(model):
    return lambda p, b: model.apply(p, **b)["loss"]


def loop_grads(loss_fn, params, batch, n):
    return [torch.func.grad(loss_fn)(params, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(n)]


def flat_norm(g):
    return torch.cat([x.flatten() for x in tree.leaves(g)]).norm()


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(tree.leaves(a), tree.leaves(b)))


@pytest.fixture(scope="module")
def gpt():
    model, params = tiny()
    batch = lm_batch()
    loss = lm_loss(model)
    return model, params, batch, loss, loop_grads(loss, params, batch, B)


# ----------------------------------------------------------------------------- grads


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 4, 5, 7])
def test_grads_equal_python_loop_for_every_chunk_size(gpt, chunk_size, method):
    model, params, batch, loss, ref = gpt
    g = ps.grads(loss, params, batch, chunk_size=chunk_size, method=method)
    assert tree.names(g) == tree.names(params)
    for i in range(B):
        assert max_diff(tree.map(lambda x: x[i], g), ref[i]) <= 1e-5
    for x, p in zip(tree.leaves(g), tree.leaves(params)):
        assert x.shape == (B,) + p.shape


@pytest.mark.parametrize(
    "over",
    [
        dict(),  # GPT-2 shaped, tied head
        dict(tie_embeddings=False, position_encoding="learnable"),  # untied head, indexed pos table (fallback)
        dict(norm="rmsnorm", activation="swiglu", bias=False, position_encoding="rope", n_kv_heads=2),  # LLaMA
        dict(norm="rmsnorm", activation="swiglu", bias=False, position_encoding="rope", tie_embeddings=False),
    ],
    ids=["gpt2-tied", "gpt2-untied-learnable", "llama-tied", "llama-untied"],
)
def test_ghost_grads_equal_python_loop_for_every_chunk_size(over):
    model, params = tiny(**over)
    batch, loss = lm_batch(2), lm_loss(model)  # example 1 is padded
    ref = loop_grads(loss, params, batch, B)
    for chunk_size in (None, 1, 2, 3, 4, 5, 7):
        g = ps.grads(loss, params, batch, chunk_size=chunk_size, method="ghost")
        assert tree.names(g) == tree.names(params)
        for x, p in zip(tree.leaves(g), tree.leaves(params)):
            assert x.shape == (B,) + p.shape and x.dtype == p.dtype
        for i in range(B):
            assert max_diff(tree.map(lambda x: x[i], g), ref[i]) <= 1e-5, (chunk_size, i)


def test_grads_methods_agree_and_auto_picks_ghost(gpt, monkeypatch):
    model, params, batch, loss, ref = gpt
    calls = []
    real = ps.route.ghost_grads
    monkeypatch.setattr(ps.route, "ghost_grads", lambda *a: calls.append(1) or real(*a))
    auto = ps.grads(loss, params, batch, chunk_size=2)
    assert calls  # the default took the factored route
    vm = ps.grads(loss, params, batch, chunk_size=2, method="vmap")
    assert max_diff(auto, vm) <= 1e-5
    assert len(calls) == 1  # method="vmap" did not


def test_ghost_grads_toy_reused_linear_and_tied_weight():
    params = toy_params(3, 1.5)
    g = torch.Generator().manual_seed(4)
    batch = {"ids": torch.randint(0, 13, (6, 4), generator=g), "y": torch.randint(0, 13, (6, 4), generator=g)}
    ref = loop_grads(toy_loss, params, batch, 6)
    for chunk_size in (None, 1, 4, 6):
        got = ps.grads(toy_loss, params, batch, chunk_size=chunk_size, method="ghost")
        for i in range(6):
            assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5


def test_ghost_grads_embedding_only_and_mixed_uses_of_one_weight():
    # "emb": two lookups and no linear use (zero fill, then both index_adds); "w": a linear use,
    # a lookup, then another linear use (the linear uses are written first, the rows added after)
    g = torch.Generator().manual_seed(7)
    params = {"emb": torch.randn(11, 4, generator=g), "w": torch.randn(4, 4, generator=g)}

    def loss(p, b):
        h = F.embedding(b["a"], p["emb"]) * F.embedding(b["c"], p["emb"])
        h = torch.tanh(F.linear(h, p["w"])) + F.embedding(b["a"] % 4, p["w"])
        return F.linear(h, p["w"]).pow(2).mean()

    batch = {"a": torch.randint(0, 11, (5, 3), generator=g), "c": torch.randint(0, 11, (5, 3), generator=g)}
    ref = loop_grads(loss, params, batch, 5)
    for chunk_size in (None, 1, 2, 5):
        got = ps.grads(loss, params, batch, chunk_size=chunk_size, method="ghost")
        for i in range(5):
            assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5, (chunk_size, i)


def test_ghost_grads_with_the_default_attention_backend_equal_python_loop():
    # attention_backend="auto": SDPA without a padding mask (on CPU it has no vmap batching rule,
    # so functorch runs it example by example), the blockwise op with one
    model, params = tiny(attention_backend="auto")
    loss = lm_loss(model)
    unpadded = {k: v for k, v in lm_batch(3).items() if k != "attention_mask"}
    for batch in (unpadded, lm_batch(4)):
        ref = loop_grads(loss, params, batch, B)
        for chunk_size in (None, 2, 5):
            got = ps.grads(loss, params, batch, chunk_size=chunk_size, method="ghost")
            for i in range(B):
                assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5, (chunk_size, i)


def test_ghost_grads_fall_back_and_auto_falls_back_on_control_flow():
    params = toy_params(0, 1.0)

    def loss(p, b):  # lin.weight used through matmul: exact fallback inside the ghost route
        h = F.embedding(b["ids"], p["emb"]) @ p["lin"]["weight"].t()
        return F.cross_entropy(F.linear(h, p["emb"]).reshape(-1, 13), b["y"].reshape(-1))

    batch = {"ids": torch.randint(0, 13, (4, 3)), "y": torch.randint(0, 13, (4, 3))}
    ref = loop_grads(loss, params, batch, 4)
    got = ps.grads(loss, params, batch, method="ghost", chunk_size=3)
    for i in range(4):
        assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5

    w = torch.randn(3, 3)
    calls = {"n": 0}

    def flaky(p, b):  # discovery sees one use, the real run two: "auto" falls back to vmap
        calls["n"] += 1
        h = F.linear(b["x"], p["w"])
        return h.sum() if calls["n"] == 1 else F.linear(h, p["w"]).sum()

    x = torch.randn(2, 1, 3)
    with pytest.raises(RuntimeError, match="control flow differs"):
        ps.grads(flaky, {"w": w}, {"x": x}, method="ghost")
    calls["n"] = 0
    got = ps.grads(flaky, {"w": w}, {"x": x})
    assert got["w"].shape == (2, 3, 3)


def test_grads_argnums_input_gradients():
    w = torch.randn(3, 4, dtype=torch.float64)
    loss = lambda p, b: ((b["x"] @ p["w"].t()).tanh() ** 2).mean()  # noqa: E731
    x = torch.randn(6, 4, dtype=torch.float64)
    gx = ps.grads(loss, {"w": w}, {"x": x}, argnums=1, chunk_size=4)["x"]
    ref = torch.stack([torch.func.grad(loss, argnums=1)({"w": w}, {"x": x[i : i + 1]})["x"][0] for i in range(6)])
    torch.testing.assert_close(gx, ref)
    gp, gx2 = ps.grads(loss, {"w": w}, {"x": x}, argnums=(0, 1))
    assert gp["w"].shape == (6, 3, 4) and torch.allclose(gx2["x"], ref)


def test_losses_equal_per_example_loop(gpt):
    model, params, batch, loss, _ = gpt
    ref = torch.stack([loss(params, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(B)])
    torch.testing.assert_close(ps.losses(loss, params, batch, chunk_size=2), ref)


# ----------------------------------------------------------------------------- norms and clipped sums


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_norms_equal_norms_of_full_grads(gpt, method, chunk_size):
    model, params, batch, loss, ref = gpt
    n = ps.norms(loss, params, batch, method=method, chunk_size=chunk_size)
    expected = torch.stack([flat_norm(r) for r in ref])
    torch.testing.assert_close(n, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("max_norm", [0.3, math.inf])
def test_clipped_sum_equals_clip_then_sum(gpt, method, max_norm):
    model, params, batch, loss, ref = gpt
    res = ps.clipped_sum(loss, params, batch, max_norm, method=method, chunk_size=3)
    norms = torch.stack([flat_norm(r) for r in ref])
    w = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    expected = tree.map(lambda *xs: sum(w[i] * xs[i] for i in range(B)), *ref)
    assert max_diff(res.sum, expected) <= 1e-5
    torch.testing.assert_close(res.norms, norms, rtol=1e-4, atol=1e-6)
    assert res.losses.shape == (B,)


@pytest.mark.parametrize(
    "over",
    [
        dict(tie_embeddings=False, position_encoding="learnable"),  # indexed pos table: exact fallback
        dict(norm="rmsnorm", activation="swiglu", bias=False, position_encoding="rope", n_kv_heads=2),
    ],
    ids=["untied-learnable", "llama"],
)
def test_ghost_norms_other_shapes(over):
    model, params = tiny(**over)
    batch, loss = lm_batch(1, n=3), lm_loss(model)
    ref = loop_grads(loss, params, batch, 3)
    torch.testing.assert_close(
        ps.norms(loss, params, batch), torch.stack([flat_norm(r) for r in ref]), rtol=1e-4, atol=1e-6
    )
    res = ps.clipped_sum(loss, params, batch, 0.5)
    w = (0.5 / (torch.stack([flat_norm(r) for r in ref]) + 1e-6)).clamp(max=1)
    assert max_diff(res.sum, tree.map(lambda *xs: sum(w[i] * xs[i] for i in range(3)), *ref)) <= 1e-5


def test_ghost_finds_every_linear_and_the_tied_embedding(gpt):
    model, params, batch, loss, _ = gpt
    mode = ps.ghost.discover(loss, params, batch)
    two_d = {n for n, x in tree.flatten(params).items() if x.dim() == 2}
    assert mode.ghost == two_d  # qkv/out/fc/proj weights of both blocks and the tied embed.weight
    kinds = [u.kind for u in mode.ghost_uses if u.name == "embed.weight"]
    assert kinds == ["embedding", "linear"]  # lookup and LM head: the cross term is needed


# A small model with a tied weight (lookup + head), a layer norm and a reused linear: fast enough
# for hypothesis, and it exercises every ghost term (linear-linear, embedding-linear, same-weight reuse).
def toy_params(seed, scale):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(13, 6, generator=g) * scale,
        "lin": {"weight": torch.randn(6, 6, generator=g) * scale, "bias": torch.randn(6, generator=g)},
        "ln": {"weight": torch.ones(6) + 0.1 * torch.randn(6, generator=g)},
    }


def toy_loss(p, b):
    h = F.embedding(b["ids"], p["emb"])  # (B, T, 6)
    h = torch.tanh(F.linear(h, p["lin"]["weight"], p["lin"]["bias"]))
    h = F.linear(h, p["lin"]["weight"], p["lin"]["bias"])  # the same linear used twice
    h = F.layer_norm(h, (6,), p["ln"]["weight"])
    logits = F.linear(h, p["emb"])  # tied head
    return F.cross_entropy(logits.reshape(-1, 13), b["y"].reshape(-1))


@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    t=st.integers(1, 5),
    scale=st.floats(0.1, 3.0),
    max_norm=st.floats(1e-3, 10.0),
    method=st.sampled_from(["ghost", "vmap"]),
    chunk=st.sampled_from([None, 1, 2, 4]),
)
def test_every_contribution_is_clipped_to_at_most_C(seed, n, t, scale, max_norm, method, chunk):
    params = toy_params(seed, scale)
    g = torch.Generator().manual_seed(seed + 1)
    batch = {"ids": torch.randint(0, 13, (n, t), generator=g), "y": torch.randint(0, 13, (n, t), generator=g)}
    full = ps.grads(toy_loss, params, batch)
    total = ps.clipped_sum(toy_loss, params, batch, max_norm, method=method, chunk_size=chunk)
    pieces = []
    for i in range(n):
        one = ps.clipped_sum(toy_loss, params, {k: v[i : i + 1] for k, v in batch.items()}, max_norm, method=method)
        assert flat_norm(one.sum) <= max_norm * (1 + 1e-5)  # the contribution of example i
        gi = tree.map(lambda x: x[i], full)
        ni = flat_norm(gi)
        torch.testing.assert_close(one.norms[0], ni, rtol=1e-4, atol=1e-6)
        # clipped = g_i scaled by min(1, C/‖g_i‖): same direction, norm min(‖g_i‖, C)
        assert max_diff(one.sum, tree.map(lambda x: x * min(1.0, max_norm / (ni.item() + 1e-6)), gi)) <= 1e-4 * max(1.0, ni.item())
        pieces.append(one.sum)
    assert max_diff(total.sum, tree.map(lambda *xs: sum(xs), *pieces)) <= 1e-4 * max(1.0, n * max_norm)


def test_ghost_falls_back_for_weights_used_otherwise():
    params = toy_params(0, 1.0)

    def loss(p, b):  # the linear weight is used through a transpose and matmul, not F.linear
        h = F.embedding(b["ids"], p["emb"]) @ p["lin"]["weight"].t()
        return F.cross_entropy(F.linear(h, p["emb"]).reshape(-1, 13), b["y"].reshape(-1))

    batch = {"ids": torch.randint(0, 13, (4, 3)), "y": torch.randint(0, 13, (4, 3))}
    mode = ps.ghost.discover(loss, params, batch)
    assert "lin.weight" not in mode.ghost and "emb" in mode.ghost
    torch.testing.assert_close(ps.norms(loss, params, batch), global_ref(loss, params, batch))


def test_ghost_weight_also_used_as_the_input_of_a_linear_takes_the_exact_route():
    # "a" is a linear weight and also the *input* of another linear (F.linear(a, b)); that second
    # use is not a weight use, so "a" must not be factored (its gradient would miss that term)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(4, 4, generator=g, dtype=torch.float64),
              "c": torch.randn(4, generator=g, dtype=torch.float64)}

    def loss(p, b):
        h = F.linear(input=b["x"], weight=p["a"])
        m = F.linear(input=p["a"], weight=p["b"], bias=p["c"])  # a as the input (keywords)
        return (F.linear(h, m) ** 2).mean()

    batch = {"x": torch.randn(3, 2, 4, generator=g, dtype=torch.float64)}
    mode = ps.ghost.discover(loss, params, batch)
    assert mode.ghost == {"b"} and mode.other == {"a"}
    ref = loop_grads(loss, params, batch, 3)
    for method in ("ghost", "auto"):
        got = ps.grads(loss, params, batch, method=method)
        for i in range(3):
            assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-10, (method, i)
    ref_norms = torch.stack([flat_norm(r) for r in ref])
    torch.testing.assert_close(ps.norms(loss, params, batch), ref_norms.float())  # norms accumulate in float32
    clipped = ps.clipped_sum(loss, params, batch, 0.5)
    want = {k: sum(min(1.0, 0.5 / (n.item() + ps.CLIP_EPS)) * r[k] for r, n in zip(ref, ref_norms)) for k in params}
    for k in params:
        torch.testing.assert_close(clipped.sum[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("used_otherwise", [False, True], ids=["ghost-table", "exact-route-table"])
@pytest.mark.parametrize("padding_idx", [0, -1])
def test_embedding_with_padding_idx_equals_vmap_for_every_chunk_size(padding_idx, used_otherwise):
    # issue 15: the padding row receives no gradient. As a ghost weight its rows of g are masked in
    # the factors; on the exact route (the table also read by indexing) functorch's batched-weight
    # embedding backward kept the padding row of the first example only, so it is rewritten.
    g = torch.Generator().manual_seed(3)
    params = {"emb": torch.randn(11, 4, generator=g), "w": torch.randn(3, 4, generator=g)}

    def loss(p, b):
        h = F.embedding(b["ids"], p["emb"], padding_idx=padding_idx)
        if used_otherwise:
            h = h + p["emb"][1]
        return F.linear(h, p["w"]).pow(2).mean()

    ids = torch.randint(0, 11, (5, 6), generator=g)
    ids[:, 0], ids[2, 1:3] = 0, 10  # every example holds the padding row (0 or V - 1)
    batch = {"ids": ids}
    assert ("emb" in ps.ghost.discover(loss, params, batch).ghost) != used_otherwise
    ref = loop_grads(loss, params, batch, 5)
    vm = ps.grads(loss, params, batch, method="vmap")
    for i in range(5):
        assert max_diff(tree.map(lambda x: x[i], vm), ref[i]) <= 1e-6
    ref_norms = torch.stack([flat_norm(r) for r in ref])
    for chunk_size in (None, 1, 2, 5):
        for method in ("ghost", "auto"):
            assert max_diff(ps.grads(loss, params, batch, method=method, chunk_size=chunk_size), vm) <= 1e-6
        torch.testing.assert_close(ps.norms(loss, params, batch, chunk_size=chunk_size), ref_norms)
        got = ps.clipped_sum(loss, params, batch, 0.5, chunk_size=chunk_size)
        want = ps.clipped_sum(loss, params, batch, 0.5, chunk_size=chunk_size, method="vmap")
        assert max_diff(got.sum, want.sum) <= 1e-6


def test_a_weight_read_through_a_property_takes_the_exact_route():
    # W.T (a property, like .mT and .data) reads the values: it is a use, unlike .shape or .dtype
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 4, generator=g), "v": torch.randn(4, 4, generator=g)}

    def loss(p, b):
        assert p["w"].shape == (4, 4) and p["w"].dtype == torch.float32 and p["w"].size(0) == 4
        h = F.linear(F.linear(b["x"], p["w"]), p["v"])
        return (h @ p["w"].T).pow(2).mean()

    batch = {"x": torch.randn(3, 2, 4, generator=g)}
    d = ps.ghost.discover(loss, params, batch)
    assert d.ghost == {"v"} and d.other == {"w"}
    ref = loop_grads(loss, params, batch, 3)
    got = ps.grads(loss, params, batch, method="ghost", chunk_size=2)
    for i in range(3):
        assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5


def test_ghost_conv1d_addmm_weight_equals_python_loop():
    # transformers' Conv1D: y = addmm(b, x, W) with W stored (in, out); its factors are (x, g)
    g = torch.Generator().manual_seed(2)
    params = {"c": {"weight": torch.randn(4, 6, generator=g), "bias": torch.randn(6, generator=g)},
              "head": torch.randn(3, 6, generator=g)}

    def loss(p, b):
        x = b["x"]
        h = torch.addmm(p["c"]["bias"], x.reshape(-1, 4), p["c"]["weight"]).reshape(*x.shape[:-1], 6)
        h = torch.addmm(p["c"]["bias"], x.reshape(-1, 4), p["c"]["weight"]).reshape(*x.shape[:-1], 6) * h.tanh()
        return F.linear(h, p["head"]).pow(2).mean()

    batch = {"x": torch.randn(5, 3, 4, generator=g)}
    d = ps.ghost.discover(loss, params, batch)
    assert d.ghost == {"c.weight", "head"} and [u.kind for u in d.ghost_uses] == ["addmm", "addmm", "linear"]
    ref = loop_grads(loss, params, batch, 5)
    for chunk_size in (None, 2):
        got = ps.grads(loss, params, batch, method="ghost", chunk_size=chunk_size)
        for i in range(5):
            assert max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-5
    ref_norms = torch.stack([flat_norm(r) for r in ref])
    torch.testing.assert_close(ps.norms(loss, params, batch, chunk_size=2), ref_norms, rtol=1e-4, atol=1e-6)
    w = (0.4 / (ref_norms + ps.CLIP_EPS)).clamp(max=1)
    want = tree.map(lambda *xs: sum(w[i] * xs[i] for i in range(5)), *ref)
    assert max_diff(ps.clipped_sum(loss, params, batch, 0.4).sum, want) <= 1e-5


def global_ref(loss, params, batch):
    return ps.global_norms(ps.grads(loss, params, batch))


def test_ghost_rejects_example_dependent_control_flow():
    w = torch.randn(3, 3)

    batch = {"x": torch.randn(2, 1, 3)}

    calls = {"n": 0}

    def flaky(p, b):  # a different op sequence on the second call (discovery, then the real run)
        calls["n"] += 1
        h = F.linear(b["x"], p["w"])
        return h.sum() if calls["n"] == 1 else F.linear(h, p["w"]).sum()

    with pytest.raises(RuntimeError, match="control flow differs"):
        ps.norms(flaky, {"w": w}, batch)


# ----------------------------------------------------------------------------- DP-SGD


def test_dp_sgd_without_noise_or_clipping_is_sgd_on_the_mean_gradient():
    model, params = tiny()
    batch = lm_batch(2, pad=False)  # equal token counts: batch loss = mean of per-example losses
    loss = lm_loss(model)
    opt = optim.sgd(0.1)
    step = ps.dp_sgd(loss, opt, max_norm=math.inf, noise_multiplier=0.0)
    new, _, info = step(params, opt.init(params), batch)
    mean_grad = tree.map(lambda x: x.mean(0), ps.grads(loss, params, batch))
    expected = tree.map(lambda p, g: p - 0.1 * g, params, mean_grad)
    assert max_diff(new, expected) <= 1e-6
    batch_grad = torch.func.grad(loss)(params, batch)
    assert max_diff(new, tree.map(lambda p, g: p - 0.1 * g, params, batch_grad)) <= 1e-6
    assert info.batch_size == B and info.norms.shape == (B,)


def test_dp_sgd_noise_is_sigma_C_gaussian_from_the_generator_over_n():
    params = toy_params(3, 1.0)
    batch = {"ids": torch.randint(0, 13, (4, 3)), "y": torch.randint(0, 13, (4, 3))}
    opt = optim.sgd(1.0)
    C, sigma, n = 0.7, 1.3, 6.0
    step = ps.dp_sgd(toy_loss, opt, max_norm=C, noise_multiplier=sigma, expected_batch_size=n)
    new, _, _ = step(params, opt.init(params), batch, torch.Generator().manual_seed(5))
    clipped = ps.clipped_sum(toy_loss, params, batch, C).sum
    g = torch.Generator().manual_seed(5)
    noise = tree.map(lambda x: sigma * C * torch.randn(x.shape, generator=g), params)  # flatten order
    expected = tree.map(lambda p, s, z: p - (s + z) / n, params, clipped, noise)
    assert max_diff(new, expected) <= 1e-6
    again, _, _ = step(params, opt.init(params), batch, torch.Generator().manual_seed(5))
    assert max_diff(new, again) == 0.0
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        step(params, opt.init(params), batch)


def test_dp_sgd_poisson_batches_including_empty():
    params = toy_params(4, 1.0)
    data = {"ids": torch.randint(0, 13, (20, 3)), "y": torch.randint(0, 13, (20, 3))}
    g = torch.Generator().manual_seed(0)
    sizes = [len(ps.poisson_sample(20, 0.25, g)) for _ in range(200)]
    assert len(set(sizes)) > 3 and abs(sum(sizes) / 200 - 5.0) < 1.0
    opt = optim.sgd(1.0)
    step = ps.dp_sgd(toy_loss, opt, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=5.0)
    empty = {k: v[:0] for k, v in data.items()}
    new, _, info = step(params, opt.init(params), empty, torch.Generator())
    assert info.batch_size == 0 and max_diff(new, params) == 0.0
    idx = ps.poisson_sample(20, 0.25, torch.Generator().manual_seed(1))
    new, _, info = step(params, opt.init(params), {k: v[idx] for k, v in data.items()}, torch.Generator())
    assert info.batch_size == len(idx) and max_diff(new, params) > 0
    bare = ps.dp_sgd(toy_loss, opt, max_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        bare(params, opt.init(params), empty)


def test_dp_aggregate_transform():
    params = toy_params(5, 1.0)
    batch = {"ids": torch.randint(0, 13, (4, 3)), "y": torch.randint(0, 13, (4, 3))}
    per = ps.grads(toy_loss, params, batch)
    t = ps.dp_aggregate(0.5, 0.0)
    state = t.init(params)
    out, state2 = t.update(per, state, params)
    assert max_diff(out, tree.map(lambda s: s / 4, ps.clipped_sum(toy_loss, params, batch, 0.5).sum)) <= 1e-6
    assert int(state2["count"]) == 1
    noisy = ps.dp_aggregate(0.5, 2.0, seed=3)
    s0 = noisy.init(params)
    a, s1 = noisy.update(per, s0, params)
    b, _ = noisy.update(per, s0, params)
    c, _ = noisy.update(per, s1, params)
    assert max_diff(a, b) == 0.0 and max_diff(a, c) > 0  # same state, same noise; next step, new noise


# ----------------------------------------------------------------------------- curvature and attribution


def test_hvp_equals_reverse_over_reverse_and_a_known_hessian():
    A = torch.randn(4, 4, dtype=torch.float64)
    A = A @ A.t()
    quad = lambda p, b: 0.5 * (p["x"] @ A @ p["x"]) * b.sum()  # noqa: E731  H = A · Σb
    x, v = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ps.hvp(quad, {"x": x}, b, {"x": v})["x"], 3.0 * A @ v)
    model, params = tiny()
    params = tree.cast(params, torch.float64)
    batch, loss = lm_batch(3, n=2), lm_loss(model)
    vec = tree.map(lambda p: torch.randn_like(p), params)
    ours = ps.hvp(loss, params, batch, vec)
    _, vjp_fn = torch.func.vjp(lambda p: torch.func.grad(loss)(p, batch), params)
    assert max_diff(ours, vjp_fn(vec)[0]) <= 1e-8


def test_grad_dots_and_tracin():
    params = toy_params(6, 1.0)
    train = {"ids": torch.randint(0, 13, (5, 3)), "y": torch.randint(0, 13, (5, 3))}
    test = {"ids": torch.randint(0, 13, (3, 3)), "y": torch.randint(0, 13, (3, 3))}
    flat = lambda g: torch.cat([x.reshape(x.shape[0], -1) for x in tree.leaves(g)], 1)  # noqa: E731
    ga, gb = flat(ps.grads(toy_loss, params, train)), flat(ps.grads(toy_loss, params, test))
    torch.testing.assert_close(ps.grad_dots(toy_loss, params, train, test, chunk_size=2), ga @ gb.t())
    torch.testing.assert_close(ps.grad_dots(toy_loss, params, train), ga @ ga.t())
    other = toy_params(7, 1.0)
    go = flat(ps.grads(toy_loss, other, train)) @ flat(ps.grads(toy_loss, other, test)).t()
    torch.testing.assert_close(ps.tracin(toy_loss, [(params, 0.5), (other, 0.25)], train, test), 0.5 * ga @ gb.t() + 0.25 * go)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors():
    params = toy_params(0, 1.0)
    good = {"ids": torch.randint(0, 13, (4, 3)), "y": torch.randint(0, 13, (4, 3))}
    with pytest.raises(ValueError, match="0-d"):
        ps.grads(toy_loss, params, {"ids": torch.tensor(3), "y": torch.tensor(1)})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        ps.norms(toy_loss, params, {"ids": good["ids"], "y": good["y"][:3]})
    with pytest.raises(ValueError, match="no tensors"):
        ps.grads(toy_loss, params, {"ids": 3})
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            ps.grads(toy_loss, params, good, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size"):
            ps.clipped_sum(toy_loss, params, good, 1.0, chunk_size=bad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            ps.clipped_sum(toy_loss, params, good, bad)
    with pytest.raises(ValueError, match="method"):
        ps.norms(toy_loss, params, good, method="hooks")
    with pytest.raises(ValueError, match="method"):
        ps.grads(toy_loss, params, good, method="hooks")
    with pytest.raises(ValueError, match="argnums"):
        ps.grads(toy_loss, params, good, method="ghost", argnums=1)
    with pytest.raises(ValueError, match="empty"):
        ps.grads(toy_loss, params, {k: v[:0] for k, v in good.items()})
    with pytest.raises(ValueError, match="noise_multiplier"):
        ps.dp_sgd(toy_loss, optim.sgd(0.1), max_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        ps.dp_sgd(toy_loss, optim.sgd(0.1), max_norm=1.0, noise_multiplier=1.0, expected_batch_size=0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sample_rate"):
            ps.poisson_sample(10, bad)
