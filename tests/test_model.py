"""The Transformer spec: shapes, loss, gradients, transforms, caches, bad input. (Causality, padding
and batch invariance, vmap == loop and init determinism: tests/test_model_properties.py, through
the public aam_func.testing checks.)"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.func import grad, jvp, vmap

import aam_func as af
from aam_func import tree


def tiny(**kw):
    base = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=2, max_seq_len=24, dropout=0.0)
    base.update(kw)
    return af.ModelConfig(**base)


VARIANTS = {
    "gpt2": dict(position_encoding="learnable", activation="gelu_tanh"),
    "llama": dict(use_rope=True, norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False, n_kv_heads=1),
    "sinusoidal": dict(),
    "relative": dict(use_relative_pos=True, max_relative_position=3),
    "local": dict(attention_type="local", max_relative_position=3),
    "sparse": dict(attention_type="sparse", max_relative_position=3),
    "sparse_fixed": dict(attention_type="sparse", max_relative_position=4, sparse_pattern="fixed"),
    "none": dict(position_encoding="none", norm="rmsnorm", activation="relu"),
}

configs = st.builds(
    lambda variant, heads, layers, seed: (tiny(n_heads=heads, n_layers=layers, **VARIANTS[variant]), seed),
    st.sampled_from(sorted(VARIANTS)),
    st.sampled_from([1, 2, 4]),
    st.integers(1, 2),
    st.integers(0, 2**16),
)


@given(configs, st.integers(1, 3), st.integers(1, 12))
def test_logits_shape_and_finite(cfg_seed, batch, seq):
    cfg, seed = cfg_seed
    m = af.Transformer(cfg)
    p = m.init(seed=seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    out = m.apply(p, ids, labels=ids)
    assert out["logits"].shape == (batch, seq, cfg.vocab_size)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["loss"])


def test_padding_is_excluded_from_loss():
    cfg = tiny()
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 3)], 1)
    a = m.apply(p, ids, labels=ids)["loss"]
    b = m.apply(p, padded, labels=padded, attention_mask=mask)["loss"]
    assert torch.allclose(a, b, atol=1e-6)


def test_loss_matches_manual_shift_and_ignore_index():
    cfg = tiny(label_smoothing=0.1)
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, 3] = -100
    out = m.apply(p, ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(
        out["logits"][:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), label_smoothing=0.1
    )
    assert torch.allclose(out["loss"], ref, atol=1e-6)
    all_ignored = torch.full_like(ids, -100)
    z = m.apply(p, ids, labels=all_ignored)["loss"]
    assert z.item() == 0.0  # documented: no targets -> 0, not NaN


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_leaf_gets_gradient(variant):
    cfg = tiny(**VARIANTS[variant])
    m = af.Transformer(cfg)
    p = m.init(seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    g = grad(lambda p: m.apply(p, ids, labels=ids)["loss"])(p)
    zero = [n for n, t in tree.flatten(g).items() if not t.abs().sum() > 0]
    assert zero == []
    assert tree.flatten(g).keys() == tree.flatten(p).keys()


@pytest.mark.parametrize("variant", ["gpt2", "llama", "local"])
def test_jvp_matches_finite_differences(variant):
    cfg = tiny(**VARIANTS[variant])
    m = af.Transformer(cfg)
    p = tree.cast(m.init(seed=0), torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    v = tree.map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), p)
    f = lambda p: m.apply(p, ids, labels=ids)["loss"]  # noqa: E731
    _, tangent = jvp(f, (p,), (v,))
    eps = 1e-6
    plus = f(tree.map(lambda a, b: a + eps * b, p, v))
    minus = f(tree.map(lambda a, b: a - eps * b, p, v))
    assert torch.allclose(tangent, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_dropout_train_is_seeded_and_eval_is_deterministic():
    cfg = tiny(dropout=0.2)
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    a = m.apply(p, ids, train=True, generator=torch.Generator().manual_seed(1))["logits"]
    b = m.apply(p, ids, train=True, generator=torch.Generator().manual_seed(1))["logits"]
    c = m.apply(p, ids, train=True, generator=torch.Generator().manual_seed(2))["logits"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(m.apply(p, ids)["logits"], m.apply(p, ids)["logits"])


def test_kv_cache_equals_full_forward():
    for variant in ("gpt2", "llama", "local"):
        cfg = tiny(**VARIANTS[variant])
        m = af.Transformer(cfg)
        p = m.init(seed=0)
        ids = torch.randint(0, cfg.vocab_size, (2, 10))
        full = m.apply(p, ids)["logits"]
        empty = [(torch.zeros(2, cfg.n_kv_heads, 0, cfg.head_dim),) * 2 for _ in range(cfg.n_layers)]
        out = m.decode(p, ids[:, :6], empty)
        steps = [out["logits"]]
        kv = out["past_kv"]
        for t in range(6, 10):
            o = m.decode(p, ids[:, t : t + 1], kv)
            steps.append(o["logits"])
            kv = o["past_kv"]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5), variant


@pytest.mark.parametrize("variant", ["gpt2", "llama", "local", "relative", "sparse"])
@pytest.mark.parametrize("in_place", [False, True])
def test_static_cache_equals_full_forward(variant, in_place):
    """Prefill 5 then decode 1 token at a time into fixed (B, Hkv, 12, hd) buffers, row 1
    left-padded by 2: logits equal the full forward; out of place, the buffers passed in stay
    zero; in place, they are the ones written."""
    cfg = tiny(**VARIANTS[variant])
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    full = m.apply(p, ids, attention_mask=mask, position_ids=pos)["logits"]
    L = 12  # more slots than tokens: the unwritten ones must never be read
    bufs = [(torch.zeros(2, cfg.n_kv_heads, L, cfg.head_dim), torch.zeros(2, cfg.n_kv_heads, L, cfg.head_dim))
            for _ in range(cfg.n_layers)]
    slot_mask = torch.ones(2, L, dtype=torch.bool)
    slot_mask[:, :9] = mask
    kv, steps = bufs, []
    for start, stop in [(0, 5)] + [(t, t + 1) for t in range(5, 9)]:
        o = m.decode(p, ids[:, start:stop], kv, attention_mask=slot_mask, position_ids=pos[:, start:stop],
                     cache_position=torch.tensor(start), write_in_place=in_place, validate=start == 0)
        assert o["past_kv"][0][0].shape == (2, cfg.n_kv_heads, L, cfg.head_dim)
        steps.append(o["logits"])
        kv = o["past_kv"]
    torch.testing.assert_close(torch.cat(steps, 1)[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert (bufs[0][0].abs().sum() > 0) == in_place and (kv[0][0] is bufs[0][0]) == in_place
    assert kv[-1][1][:, :, 9:].abs().sum() == 0  # nothing written past the tokens


def _empty_cache(cfg, batch, static_len=None):
    n = 0 if static_len is None else static_len
    return [(torch.zeros(batch, cfg.n_kv_heads, n, cfg.head_dim), torch.zeros(batch, cfg.n_kv_heads, n, cfg.head_dim))
            for _ in range(cfg.n_layers)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_decode_token_by_token_equals_apply_at_every_position(variant, kind):
    """decode from an empty cache, one token per call, row 1 left-padded by 3: the logits at
    every real position equal apply's over the whole sequence, and a one-call prefill gives
    apply's loss (labels through decode count the same tokens)."""
    cfg = tiny(**VARIANTS[variant])
    m = af.Transformer(cfg)
    p = m.init(seed=1)
    T = 11
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    want = m.apply(p, ids, attention_mask=mask, position_ids=pos, labels=ids)
    L = None if kind == "dynamic" else 16
    kv, steps = _empty_cache(cfg, 2, L), []
    for t in range(T):
        static = {} if L is None else dict(cache_position=torch.tensor(t))
        key_mask = mask[:, : t + 1] if L is None else torch.cat([mask, torch.ones(2, L - T, dtype=torch.long)], 1)
        o = m.decode(p, ids[:, t : t + 1], kv, attention_mask=key_mask, position_ids=pos[:, t : t + 1], **static)
        kv = o["past_kv"]
        steps.append(o["logits"])
        assert o["loss"] is None and kv[0][0].shape[2] == (t + 1 if L is None else L)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], want["logits"][real], atol=1e-5, rtol=1e-5)
    static = {} if L is None else dict(cache_position=torch.tensor(0))
    key_mask = mask if L is None else torch.cat([mask, torch.ones(2, L - T, dtype=torch.long)], 1)
    once = m.decode(p, ids, _empty_cache(cfg, 2, L), attention_mask=key_mask, position_ids=pos, labels=ids, **static)
    torch.testing.assert_close(once["loss"], want["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(once["logits"][real], want["logits"][real], atol=1e-5, rtol=1e-5)


def test_apply_has_no_cache_arguments():
    """KV-cached decoding is decode(): apply takes no cache, and never returns one."""
    cfg = tiny()
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.zeros(1, 2, dtype=torch.long)
    for kw in ({"past_kv": _empty_cache(cfg, 1, None)}, {"cache_position": torch.tensor(0)}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            m.apply(p, ids, **kw)
    assert "past_kv" not in m.apply(p, ids)


def test_static_cache_bad_position_and_validate_false_skips_checks(monkeypatch):
    cfg = tiny()
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    kv = [(torch.zeros(1, cfg.n_kv_heads, 6, cfg.head_dim),) * 2 for _ in range(cfg.n_layers)]
    with pytest.raises(ValueError, match="cache_position 5 \\+ 2 new tokens does not fit a static cache of 6"):
        m.decode(p, torch.zeros(1, 2, dtype=torch.long), kv, cache_position=torch.tensor(5))
    with pytest.raises(TypeError, match="0-d integer tensor"):
        m.decode(p, torch.zeros(1, 2, dtype=torch.long), kv, cache_position=3)
    with pytest.raises(ValueError, match="one \\(k, v\\) per layer"):
        m.decode(p, torch.zeros(1, 2, dtype=torch.long), kv[:1])
    with pytest.raises(ValueError, match="decode needs past_kv"):
        m.decode(p, torch.zeros(1, 2, dtype=torch.long), None, cache_position=torch.tensor(0))
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    want = m.apply(p, ids)["logits"]

    def boom(*a, **k):
        raise AssertionError("validated although validate=False")

    monkeypatch.setattr(af.Transformer, "check_params", boom)
    monkeypatch.setattr(af.Transformer, "_check_ids", boom)
    assert torch.equal(m.apply(p, ids, validate=False)["logits"], want)
    with pytest.raises(AssertionError, match="validated"):
        m.apply(p, ids)


def test_attention_q_offset_equals_truncated_keys():
    """q_offset=p over a buffer of L slots == bottom-right attention over the first p + T keys,
    on every dense backend, with GQA, padding and a window; and one causal query (q_len 1, now
    on SDPA's mask-free path) equals the reference."""
    from aam_func.ops.attention import attention, reference

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, L, d, off = 2, 4, 2, 3, 11, 8, 5
    q = torch.randn(B, H, T, d, generator=g)
    k, v = torch.randn(B, Hkv, L, d, generator=g), torch.randn(B, Hkv, L, d, generator=g)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, :3] = False
    for kw in (dict(), dict(key_padding_mask=kpm), dict(window=3)):
        n = off + T
        trunc = {k_: (x[:, :n] if k_ == "key_padding_mask" else x) for k_, x in kw.items()}
        want = reference(q, k[:, :, :n], v[:, :, :n], causal=True, **trunc)
        for backend in ("math", "sdpa", "auto"):
            for o in (off, torch.tensor(off)):
                got = attention(q, k, v, causal=True, q_offset=o, backend=backend, **kw)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, v, causal=True, q_offset=off, backend="blockwise")
    q1 = q[:, :, :1]
    torch.testing.assert_close(attention(q1, k, v, causal=True), reference(q1, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_auto_attention_takes_math_under_cpu_bf16_autocast_with_grad(monkeypatch):
    """auto avoids SDPA (slow CPU backward in bf16) only when autocast bf16 and a gradient meet."""
    from aam_func.ops import attention as A

    calls = []
    real = A._sdpa
    monkeypatch.setattr(A, "_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    W = torch.randn(4, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb = q @ W, k @ W, v @ W  # bf16, tracked
        out = A.attention(qb, kb, vb, causal=True)
        assert out.dtype == torch.bfloat16 and not calls
        assert torch.equal(out, A.reference(qb, kb, vb, causal=True))
        out.float().sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        with torch.no_grad():
            A.attention(qb, kb, vb, causal=True)
    assert len(calls) == 1  # no gradient: SDPA
    A.attention(q, k, v, causal=True)
    assert len(calls) == 2  # fp32 with gradient: SDPA


def test_inputs_embeds_equals_ids():
    cfg = tiny(position_encoding="learnable")
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    a = m.apply(p, ids, labels=ids)
    b = m.apply(p, inputs_embeds=m.embed(p, ids), labels=ids)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])


def test_torch_compile_composes():
    cfg = tiny()
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    f = lambda p, ids: grad(lambda p: m.apply(p, ids, labels=ids)["loss"])(p)  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)
    a, b = f(p, ids), compiled(p, ids)
    for x, y in zip(tree.leaves(a), tree.leaves(b)):
        assert torch.allclose(x, y, atol=1e-6)


class TestBadInput:
    m = af.Transformer(tiny())
    p = m.init(seed=0)
    ids = torch.randint(0, 37, (2, 5))

    def test_token_out_of_vocab(self):
        with pytest.raises(ValueError, match="token id 37, outside"):
            self.m.apply(self.p, torch.tensor([[1, 37]]))

    def test_negative_token(self):
        with pytest.raises(ValueError, match="token id -1"):
            self.m.apply(self.p, torch.tensor([[-1, 2]]))

    def test_too_many_positions(self):
        with pytest.raises(ValueError, match="25 positions but max_seq_len is 24"):
            self.m.apply(self.p, torch.zeros(1, 25, dtype=torch.long))

    def test_float_ids(self):
        with pytest.raises(TypeError, match="integer tensor"):
            self.m.apply(self.p, self.ids.float())

    def test_ids_rank(self):
        with pytest.raises(ValueError, match=r"\(batch, seq\)"):
            self.m.apply(self.p, self.ids[0])

    def test_mask_shape_and_values(self):
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\) = \(2, 5\) in shape"):
            self.m.apply(self.p, self.ids, attention_mask=torch.ones(2, 4))
        with pytest.raises(ValueError, match="only 0 and 1"):
            self.m.apply(self.p, self.ids, attention_mask=torch.full((2, 5), 2))
        with pytest.raises(TypeError, match="attention_mask must be a Tensor"):
            self.m.apply(self.p, self.ids, attention_mask=[[1] * 5] * 2)

    def test_key_padding_mask(self):
        """The one 0/1 mask check (model, generate and compat use it): bool passes through,
        0/1 of any dtype becomes bool, other values and shapes are errors; validate=False skips
        only the value check."""
        from aam_func.model import key_padding_mask

        b = torch.tensor([[True, False, True]])
        assert key_padding_mask(None, 1, 3) is None and key_padding_mask(b, 1, 3) is b
        for dtype in (torch.long, torch.int32, torch.float32):
            assert key_padding_mask(b.to(dtype), 1, 3).tolist() == b.tolist()
        with pytest.raises(ValueError, match="only 0 and 1"):
            key_padding_mask(torch.tensor([[1, 0, 2]]), 1, 3)
        with pytest.raises(ValueError, match="only 0 and 1"):
            key_padding_mask(torch.tensor([[1.0, 0.5, 1.0]]), 1, 3)
        assert key_padding_mask(torch.tensor([[1, 0, 2]]), 1, 3, validate=False).tolist() == [[True, False, True]]
        with pytest.raises(ValueError, match=r"\(1, 4\) in shape, got \(1, 3\)"):
            key_padding_mask(b, 1, 4, validate=False)

    def test_labels(self):
        with pytest.raises(ValueError, match="labels must have shape"):
            self.m.apply(self.p, self.ids, labels=self.ids[:, :3])
        with pytest.raises(TypeError, match="labels must be an integer"):
            self.m.apply(self.p, self.ids, labels=self.ids.float())
        with pytest.raises(ValueError, match="labels contains 99"):
            self.m.apply(self.p, self.ids, labels=torch.full((2, 5), 99))

    def test_params_missing_extra_misshaped_all_listed(self):
        flat = tree.flatten(self.p)
        del flat["ln_f.bias"]
        flat["extra.weight"] = torch.zeros(1)
        flat["embed.weight"] = torch.zeros(3, 16)
        with pytest.raises(ValueError) as e:
            self.m.apply(tree.unflatten(flat), self.ids)
        msg = str(e.value)
        assert "missing: ln_f.bias" in msg and "unexpected: extra.weight" in msg
        assert "embed.weight (expected (37, 16), got (3, 16))" in msg

    def test_position_ids(self):
        with pytest.raises(ValueError, match="position_ids must lie in"):
            self.m.apply(self.p, self.ids, position_ids=torch.arange(5) + 30)

    def test_both_or_neither_inputs(self):
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            self.m.apply(self.p)

    def test_not_a_config(self):
        with pytest.raises(TypeError, match="ModelConfig"):
            af.Transformer({"vocab_size": 3})


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, use_rope=True, tie_embeddings=False)])
def test_fused_loss_equals_unfused_and_gradients_match(kw):
    cfg = tiny(**kw)
    m, m_off = af.Transformer(cfg), af.Transformer(cfg.replace(fused_cross_entropy=False))
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    fused = lambda p: m.apply(p, ids, labels=ids, attention_mask=mask, return_logits=False)["loss"]  # noqa: E731
    plain = lambda p: m_off.apply(p, ids, labels=ids, attention_mask=mask, return_logits=False)["loss"]  # noqa: E731
    assert m.apply(p, ids, labels=ids, return_logits=False)["logits"] is None
    assert abs(fused(p).item() - plain(p).item()) <= 1e-6
    gf, gp = grad(fused)(p), grad(plain)(p)
    for n, t in tree.flatten(gp).items():
        torch.testing.assert_close(tree.flatten(gf)[n], t, rtol=1e-4, atol=1e-6)


def test_focal_config_reaches_the_loss():
    cfg = tiny(focal_loss_gamma=2.0)
    m = af.Transformer(cfg)
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    focal = m.apply(p, ids, labels=ids)["loss"]
    plain = af.Transformer(tiny()).apply(p, ids, labels=ids)["loss"]
    assert focal < plain  # (1 - p)^2 < 1 down-weights every token
    assert torch.allclose(m.apply(p, ids, labels=ids, return_logits=False)["loss"], focal)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_same_values_and_grads(dropout):
    cfg = tiny(dropout=dropout)
    m, m_ck = af.Transformer(cfg), af.Transformer(cfg.replace(gradient_checkpointing=True))
    p = m.init(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))

    def loss(model):
        return lambda p: model.apply(
            p, ids, labels=ids, train=True, generator=torch.Generator().manual_seed(3)
        )["loss"]

    g, g_ck = grad(loss(m))(p), grad(loss(m_ck))(p)
    for n, t in tree.flatten(g).items():
        torch.testing.assert_close(tree.flatten(g_ck)[n], t, rtol=1e-5, atol=1e-7)
    per = vmap(grad(lambda p, x: m_ck.apply(p, x[None], labels=x[None])["loss"]), in_dims=(None, 0))(p, ids)
    ref = vmap(grad(lambda p, x: m.apply(p, x[None], labels=x[None])["loss"]), in_dims=(None, 0))(p, ids)
    for n, t in tree.flatten(ref).items():
        torch.testing.assert_close(tree.flatten(per)[n], t, rtol=1e-5, atol=1e-7)
