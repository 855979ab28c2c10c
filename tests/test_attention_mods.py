"""score_mod / mask_mod / block_mask (issue 20): the blockwise kernel equals the dense math in
float64 for random mods from a small grammar (outputs, gradients including captured tensors,
jvp, vmap(grad), double backward), the predefined mods equal the fixed menu, tiles are skipped
by the block mask, and bad mods are refused before any kernel runs. Parity with
FlexAttention's own forward is in tests/test_attention_mods_flex.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp, vmap

from aam_func.ops.attention import (BlockMask, RelativeBias, Sparsity, attention, create_block_mask, kernel, mods,
                                    reference)

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------ the grammar of mods
#
# A case is (score terms, mask terms, shapes). Score terms capture float tables (learned: they
# get gradients); mask terms capture integer tensors (document ids, prefix lengths).


def score_term(name: str, H: int, g: torch.Generator):
    """(score_mod, captured float tensors) for one term of the grammar."""
    if name == "table":
        t = torch.randn(H, 7, generator=g, dtype=DT)
        return (lambda tab: mods.relative_table(tab, 3)), [t]
    if name == "alibi":
        t = torch.rand(H, generator=g, dtype=DT)
        return mods.alibi, [t]
    if name == "headscale":
        t = torch.randn(H, generator=g, dtype=DT)
        return (lambda s_: (lambda score, b, h, q, kv: score * s_[h])), [t]
    if name == "softcap":
        return (lambda: mods.softcap(1.5)), []
    if name == "tanh_where":  # a branch on positions, elementwise
        return (lambda: (lambda score, b, h, q, kv: torch.where(q >= kv, torch.tanh(score), score - 0.5))), []
    raise AssertionError(name)


def mask_term(name: str, B: int, Tq: int, Tk: int, g: torch.Generator):
    if name == "causal":
        return lambda b, h, q, kv: kv <= q + (Tk - Tq)
    if name == "window":
        return mods.sliding_window(3, causal=False)
    if name == "document":
        doc = torch.sort(torch.randint(0, 3, (B, max(Tq, Tk)), generator=g), dim=-1).values
        return lambda b, h, q, kv: doc[b, q] == doc[b, kv]
    if name == "prefix":
        return mods.prefix_lm(torch.randint(0, Tk + 1, (B,), generator=g))
    if name == "strided":
        return mods.strided(2)
    if name == "sparse_rows":  # may leave rows with no key: they give 0
        return lambda b, h, q, kv: (q + kv + h) % 3 == 0
    raise AssertionError(name)


SCORES = ("table", "alibi", "headscale", "softcap", "tanh_where")
MASKS = ("causal", "window", "document", "prefix", "strided", "sparse_rows")


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    Tk = draw(st.integers(1, 9))
    Tq = draw(st.integers(1, Tk))
    d = draw(st.integers(1, 3))
    scores = draw(st.lists(st.sampled_from(SCORES), max_size=2))
    masks = draw(st.lists(st.sampled_from(MASKS), max_size=2))
    combine = draw(st.sampled_from(("and", "or")))
    bq, bk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, d=d, scores=scores, masks=masks, combine=combine, bq=bq, bk=bk,
                causal=causal, seed=seed)


def build(c):
    """(inputs q, k, v, *tables; f(backend, q, k, v, *tables) -> out) of a case."""
    g = torch.Generator().manual_seed(c["seed"])
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    q, k, v = r(c["B"], c["H"], c["Tq"], c["d"]), r(c["B"], c["Hkv"], c["Tk"], c["d"]), r(c["B"], c["Hkv"], c["Tk"], c["d"])
    makers, tables = [], []
    for name in c["scores"]:
        make, ts = score_term(name, c["H"], g)
        makers.append((make, len(ts)))
        tables += ts
    mask_list = [mask_term(n, c["B"], c["Tq"], c["Tk"], g) for n in c["masks"]]
    mask_mod = None
    if mask_list:
        mask_mod = (mods.and_masks if c["combine"] == "and" else mods.or_masks)(*mask_list)

    def mods_of(*tabs):
        score_mods, i = [], 0
        for make, n in makers:  # the closures capture the (possibly transformed) tables
            score_mods.append(make(*tabs[i:i + n]))
            i += n
        return (mods.compose_scores(*score_mods) if score_mods else None), mask_mod

    def f(backend, q, k, v, *tabs):
        sm, mm = mods_of(*tabs)
        return attention(q, k, v, causal=c["causal"], score_mod=sm, mask_mod=mm, backend=backend,
                         block_q=c["bq"], block_k=c["bk"])

    f.mods_of = mods_of
    return (q, k, v, *tables), f


@settings(deadline=None)
@given(cases())
def test_blockwise_equals_dense_math_for_random_mods(c):
    inputs, f = build(c)
    inputs = [x.requires_grad_() for x in inputs]
    out, ref = f("blockwise", *inputs), f("math", *inputs)
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.isfinite(out).all()
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(g_out, g_ref):  # q, k, v and every captured table
        torch.testing.assert_close(a, b, **TOL)
    tangents = [torch.randn_like(x) for x in inputs]
    detached = [x.detach() for x in inputs]
    _, t_out = jvp(lambda *xs: f("blockwise", *xs), tuple(detached), tuple(tangents))
    _, t_ref = jvp(lambda *xs: f("math", *xs), tuple(detached), tuple(tangents))
    torch.testing.assert_close(t_out, t_ref, **TOL)


@settings(deadline=None, max_examples=6)
@given(cases())
def test_vmap_grad_over_captured_tables_equals_dense(c):
    inputs, f = build(c)
    argnums = tuple(range(len(inputs)))  # q, k, v and every captured table
    batched = [torch.stack([x, x + 0.1 * torch.randn_like(x)]) for x in inputs]
    loss = lambda backend: (lambda *xs: f(backend, *xs).square().sum())  # noqa: E731
    a = vmap(grad(loss("blockwise"), argnums=argnums))(*batched)
    b = vmap(grad(loss("math"), argnums=argnums))(*batched)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


def _small_case():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT, requires_grad=True)  # noqa: E731
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    mask = mods.and_masks(mods.causal_mask, mods.document(doc))

    def f(q, k, v, tab, slopes):
        sm = mods.compose_scores(mods.relative_table(tab, 3), mods.alibi(slopes), mods.softcap(2.0))
        return attention(q, k, v, score_mod=sm, mask_mod=mask, backend="blockwise", block_q=2, block_k=3)

    return f, (r(1, 2, 7, 2), r(1, 1, 7, 2), r(1, 1, 7, 2), r(2, 7), r(2))


@pytest.mark.slow  # 16 s under load; the registry gradchecks a mod sample in CI (test_ops_registry.py)
def test_gradcheck_forward_ad_batched_grad_with_captured_tables():
    f, args = _small_case()
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, check_batched_grad=True)


@pytest.mark.slow  # 13 s under load; the registry's gradgradcheck covers a mod sample in CI
def test_gradgradcheck_with_captured_tables():
    f, args = _small_case()
    assert torch.autograd.gradgradcheck(f, args)


def test_hessian_vector_forward_over_reverse_equals_dense():
    f, args = _small_case()
    args = [a.detach() for a in args]
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    mask = mods.and_masks(mods.causal_mask, mods.document(doc))

    def loss(backend):
        def fn(tab, q):
            sm = mods.compose_scores(mods.relative_table(tab, 3), mods.softcap(2.0))
            return attention(q, args[1], args[2], score_mod=sm, mask_mod=mask, backend=backend, block_q=2,
                             block_k=2).square().sum()
        return fn

    t = (torch.randn_like(args[3]), torch.randn_like(args[0]))
    a = jvp(grad(loss("blockwise"), argnums=(0, 1)), (args[3], args[0]), t)[1]
    b = jvp(grad(loss("math"), argnums=(0, 1)), (args[3], args[0]), t)[1]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


def test_empty_rows_give_zero_output_and_zero_gradient():
    q, k, v = (torch.randn(1, 1, 4, 2, dtype=DT, requires_grad=True) for _ in range(3))
    mask = lambda b, h, qi, kv: (qi != 1) & (kv <= qi)  # noqa: E731 - row 1 reads nothing
    for backend in ("blockwise", "math"):
        out = attention(q, k, v, mask_mod=mask, backend=backend, block_q=1, block_k=2)
        assert torch.equal(out[0, 0, 1], torch.zeros(2, dtype=DT))
        (gq,) = torch.autograd.grad(out.sum(), (q,))
        assert torch.equal(gq[0, 0, 1], torch.zeros(2, dtype=DT)) and torch.isfinite(gq).all()


# --------------------------------------------------------- predefined mods == the fixed menu


def _qkv(B=2, H=2, Hkv=1, T=11, d=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g, dtype=dtype), torch.randn(B, Hkv, T, d, generator=g, dtype=dtype),
            torch.randn(B, Hkv, T, d, generator=g, dtype=dtype))


MENU = {
    "causal": (dict(causal=True), dict(mask_mod=mods.causal_mask)),
    "window": (dict(causal=True, window=3), dict(mask_mod=mods.sliding_window(3))),
    "window_bidir": (dict(window=3), dict(mask_mod=mods.sliding_window(3, causal=False))),
    "strided": (dict(causal=True, sparsity=Sparsity("strided", stride=3)),
                dict(mask_mod=mods.and_masks(mods.causal_mask, mods.strided(3)))),
    "fixed": (dict(causal=True, sparsity=Sparsity("fixed", stride=4, summary=2)),
              dict(mask_mod=mods.and_masks(mods.causal_mask, mods.fixed(4, 2)))),
}


@pytest.mark.parametrize("name", list(MENU))
def test_predefined_masks_equal_the_menu_bit_for_bit(name):
    menu, mod = MENU[name]
    q, k, v = _qkv()
    a = attention(q, k, v, backend="blockwise", block_q=4, block_k=4, **menu)
    b = attention(q, k, v, backend="blockwise", block_q=4, block_k=4, **mod)
    assert torch.equal(a, b)
    torch.testing.assert_close(attention(q, k, v, backend="math", **mod), reference(q, k, v, **menu))


def test_predefined_padding_equals_key_padding_mask():
    q, k, v = _qkv()
    kpm = torch.tensor([[True] * 8 + [False] * 3, [False] * 2 + [True] * 9])
    a = attention(q, k, v, causal=True, key_padding_mask=kpm, backend="blockwise", block_q=4, block_k=4)
    b = attention(q, k, v, causal=True, mask_mod=mods.padding(kpm), backend="blockwise", block_q=4, block_k=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["alibi", "t5"])
def test_predefined_score_mods_equal_the_relative_bias(kind):
    q, k, v = _qkv(H=2, Hkv=2, dtype=DT)
    table = torch.rand(2, dtype=DT) if kind == "alibi" else torch.randn(2, 8, dtype=DT)
    rel = RelativeBias(kind, table, max_distance=6, num_buckets=8)
    sm = mods.alibi(table) if kind == "alibi" else mods.t5(table, num_buckets=8, max_distance=6)
    a = attention(q, k, v, causal=True, relative_bias=rel, backend="blockwise", block_q=4, block_k=4)
    b = attention(q, k, v, causal=True, score_mod=sm, backend="blockwise", block_q=4, block_k=4)
    torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------- block masks


def test_block_mask_states_match_the_dense_mask_and_skip_empty_tiles():
    doc = torch.arange(32).div(8, rounding_mode="floor")[None]  # 4 documents of 8
    mask = mods.and_masks(mods.causal_mask, mods.document(doc))
    bm = create_block_mask(mask, 1, None, 32, 32, BLOCK_SIZE=4)
    dense = mask(*mods.index_grid(1, 1, 32, 32, "cpu"))[0, 0].reshape(8, 4, 8, 4)
    assert torch.equal(bm.states[0, 0] != 0, dense.any(-1).any(1))
    assert torch.equal(bm.states[0, 0] == 2, dense.all(-1).all(1))
    # per query tile: its own document's tiles only (2 of 8 per row on the diagonal band)
    assert [len(row) for row in bm.plan] == [1, 2] * 4
    assert bm.sparsity == pytest.approx(1 - 12 / 64)


def test_mask_mod_is_called_on_partial_tiles_only_and_the_block_mask_is_reused(monkeypatch):
    calls = []
    doc = torch.arange(16).div(4, rounding_mode="floor")[None]

    def mask(b, h, q, kv):
        calls.append(q.numel() * kv.numel())
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    bm = create_block_mask(mask, 1, 1, 16, 16, BLOCK_SIZE=4)
    n_build = len(calls)
    q, k, v = (x.requires_grad_() for x in _qkv(B=1, H=1, T=16))
    built = []
    monkeypatch.setattr(kernel, "create_block_mask", lambda *a, **kw: built.append(1))
    out = attention(q, k, v, block_mask=bm, backend="blockwise")
    out.sum().backward()
    assert not built  # neither the forward nor the backward builds another block mask
    # the four diagonal 4x4 tiles are partial: one call each in the forward and in the backward;
    # the full and empty tiles read no mask
    assert calls[n_build:] == [16] * 8


def test_mask_mod_alone_builds_a_block_mask_per_call_with_the_call_shape():
    q, k, v = _qkv(B=2, H=2, Hkv=2, T=9)
    doc = torch.tensor([[0] * 4 + [1] * 5, [0] * 2 + [1] * 7])
    a = attention(q, k, v, mask_mod=mods.document(doc), backend="blockwise", block_q=4, block_k=4)
    bm = create_block_mask(mods.document(doc), 2, 2, 9, 9, BLOCK_SIZE=4)
    b = attention(q, k, v, block_mask=bm, backend="blockwise")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input


def _boom(*a, **kw):
    raise AssertionError("a kernel ran")


@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setattr(kernel, "BlockwiseAttention", type("Boom", (), {"apply": staticmethod(_boom)}))
    import aam_func.ops.attention as A
    monkeypatch.setattr(A, "reference", _boom)
    monkeypatch.setattr(A, "blockwise", _boom)


BAD = [
    (dict(score_mod=lambda score, b, h, q: score), TypeError, "score_mod must take 5 positional arguments"),
    (dict(score_mod=lambda score, b, h, q, kv, extra: score), TypeError, "score_mod must take 5"),
    (dict(score_mod=3), TypeError, "score_mod must be a callable"),
    (dict(score_mod=lambda score, b, h, q, kv: q > kv), TypeError, "score_mod must return a floating tensor"),
    (dict(mask_mod=lambda score, b, h, q, kv: q > kv), TypeError, "mask_mod must take 4 positional arguments"),
    (dict(mask_mod=lambda b, h, q, kv: (q - kv).float()), TypeError, "mask_mod must return a bool tensor .True: the key may be read., got torch.float32"),
    (dict(mask_mod=lambda b, h, q, kv: 1), TypeError, "mask_mod must return a bool tensor .True: the key may be read., got int"),
    (dict(block_mask=create_block_mask(mods.causal_mask, 1, 1, 8, 8)), ValueError,
     r"block_mask was built for shape \(B, H, Q_LEN, KV_LEN\) = \(1, 1, 8, 8\), but this call has \(2, 2, 6, 6\)"),
    (dict(block_mask=create_block_mask(mods.causal_mask, 3, 1, 6, 6)), ValueError, "block_mask was built for shape"),
    (dict(block_mask="causal"), TypeError, "block_mask must be an aam_func BlockMask"),
    (dict(block_mask=create_block_mask(mods.causal_mask, 1, 1, 6, 6), mask_mod=mods.causal_mask.__call__), ValueError,
     "mask_mod and block_mask disagree"),
    (dict(mask_mod=mods.causal_mask, backend="sdpa"), ValueError, "not with backend='sdpa'"),
    (dict(mask_mod=mods.causal_mask, q_offset=0), ValueError, "not with q_offset"),
]


@pytest.mark.parametrize("kw, error, match", BAD)
def test_bad_mods_are_refused_before_any_kernel_runs(no_kernel, kw, error, match):
    q, k, v = _qkv(B=2, H=2, Hkv=2, T=6)
    with pytest.raises(error, match=match):
        attention(q, k, v, **kw)


GLOBAL_TABLE = torch.zeros(2, requires_grad=True)


def test_a_global_tensor_that_needs_grad_is_refused(no_kernel):
    q, k, v = _qkv(B=1, H=2, Hkv=2, T=4)
    with pytest.raises(ValueError, match="reads the global tensor"):
        attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + GLOBAL_TABLE[h])


def test_create_block_mask_checks_its_arguments():
    with pytest.raises(TypeError, match="mask_mod must return a bool tensor"):
        create_block_mask(lambda b, h, q, kv: q - kv, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="Q_LEN"):
        create_block_mask(mods.causal_mask, 1, 1, 0, 4)
    assert isinstance(create_block_mask(mods.causal_mask, None, None, 4, 4), BlockMask)


def test_captured_tensors_are_found_through_nested_mods_and_rebound():
    a, b = torch.ones(2), torch.zeros(1, 3, dtype=torch.long)
    sm = mods.compose_scores(mods.alibi(a), mods.softcap(1.0))
    mm = mods.and_masks(mods.causal_mask, mods.document(b))
    found = mods.captured_tensors(sm, mm)
    assert [id(t) for t in found] == [id(a), id(b)]
    a2 = torch.full((2,), 5.0)
    rebound = mods.rebind(sm, [a], [a2])
    assert mods.captured_tensors(rebound) == [a2] and mods.captured_tensors(sm)[0] is a


# ------------------------------------------------------------------------- dispatch table


def _facts(**changes):
    from aam_func.ops.attention import backends

    base = dict(backend="auto", device="cuda", same_dtype=True, cpu_bf16_grad=False, compiling=False, forward_ad=False,
                vmap=False, q_offset=False, relative_bias=False, dropout=False, padding=False, window=False,
                sparsity=False, causal=True, q_len=4, k_len=4, mods=True, flex_available=True)
    return backends.choose_path(backends.CallFacts(**{**base, **changes}))


def test_mods_route_to_flex_on_cuda_only_where_it_serves_the_call():
    assert _facts().path == "flex"
    for why in (dict(device="cpu"), dict(forward_ad=True), dict(vmap=True), dict(compiling=True),
                dict(relative_bias=True), dict(padding=True), dict(window=True), dict(sparsity=True),
                dict(q_len=2), dict(flex_available=False), dict(backend="blockwise"), dict(same_dtype=False)):
        assert _facts(**why).path == "blockwise", why
    assert _facts(backend="math").path == "math"
    assert _facts(dropout=True).path == "math"
    assert _facts(causal=False, q_len=2).path == "flex"  # no causal triangle to fold
    with pytest.raises(ValueError, match="not with backend='xformers'"):
        _facts(backend="xformers")
