"""The attention op: blockwise == math == a naive dense loop, under every transform.

The naive implementation below is written independently of the op: masks come from Python
loops over (i, j) with the documented rules, and the relative terms from explicit table
look-ups, so the op's own helpers (allowed_mask, relative_logits) are checked too.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jvp, vmap

import aam_func
from aam_func.ops import attention as A
from aam_func.ops.attention import RelativeBias, Sparsity, attention, reference
from aam_func.ops.attention.tiles import Opts, key_tiles

F64 = torch.float64


# ------------------------------------------------------------------ the naive twin
def _allowed(i, j, *, causal, window, sparsity):
    ok = True
    if causal:
        ok = ok and j <= i
    if window is not None:
        ok = ok and ((0 <= i - j < window) if causal else abs(i - j) < window)
    if sparsity is not None:
        if sparsity.pattern == "strided":
            l = sparsity.stride
            sp = abs(i - j) < l or (i - j) % l == 0
        elif sparsity.pattern == "fixed":
            l, c = sparsity.stride, sparsity.summary
            sp = i // l == j // l or j % l >= l - c
        else:
            L = sparsity.layout
            b = sparsity.block_size
            sp = bool(L[min(i // b, L.shape[0] - 1), min(j // b, L.shape[1] - 1)])
        ok = ok and (sp or i == j)
    return ok


def naive(q, k, v, *, causal=False, key_padding_mask=None, window=None, sparsity=None, relative_bias=None, scale=None):
    B, H, Tq, d = q.shape
    Tk, R = k.shape[2], H // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    off = Tk - Tq
    outs = []
    for b in range(B):
        heads = []
        for h in range(H):
            kh, vh, qh = k[b, h // R], v[b, h // R], q[b, h]
            logits = qh @ kh.T
            rel = relative_bias
            if rel is not None and rel.kind == "shaw":
                K = rel.max_distance
                idx = torch.tensor([[min(max(j - (off + i), -K), K) + K for j in range(Tk)] for i in range(Tq)])
                table = rel.table if rel.table.dim() == 2 else rel.table[h]
                logits = logits + torch.einsum("id,ijd->ij", qh, table[idx])
            logits = logits * scale
            if rel is not None and rel.kind == "t5":
                rp = torch.arange(Tk)[None, :] - torch.arange(off, Tk)[:, None]
                bucket = A.t5_bucket(rp, bidirectional=rel.bidirectional, num_buckets=rel.num_buckets, max_distance=rel.max_distance)
                logits = logits + rel.table[h][bucket]
            if rel is not None and rel.kind == "alibi":
                dist = torch.tensor([[abs(j - (off + i)) for j in range(Tk)] for i in range(Tq)], dtype=q.dtype)
                logits = logits - rel.table[h] * dist
            mask = torch.tensor(
                [
                    [
                        _allowed(off + i, j, causal=causal, window=window, sparsity=sparsity)
                        and (key_padding_mask is None or bool(key_padding_mask[b, j]) or j == off + i)
                        for j in range(Tk)
                    ]
                    for i in range(Tq)
                ]
            )
            p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
            heads.append(p @ vh)
        outs.append(torch.stack(heads))
    return torch.stack(outs)


# ------------------------------------------------------------------ helpers
def _rand(*shape, dtype=F64, g=None):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _variant(name, H, d, g, dtype=F64):
    """Keyword arguments (without tensors that need grads) for a named variant."""
    if name == "standard":
        return {}
    if name == "local":
        return {"window": 3}
    if name == "strided":
        return {"sparsity": Sparsity("strided", stride=3)}
    if name == "fixed":
        return {"sparsity": Sparsity("fixed", stride=3, summary=1)}
    if name == "block":
        layout = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
        return {"sparsity": Sparsity("block", block_size=3, layout=layout)}
    if name == "shaw":
        return {"relative_bias": RelativeBias("shaw", _rand(5, d, dtype=dtype, g=g), max_distance=2)}
    if name == "shaw_heads":
        return {"relative_bias": RelativeBias("shaw", _rand(H, 5, d, dtype=dtype, g=g), max_distance=2)}
    if name == "t5":
        return {"relative_bias": RelativeBias("t5", _rand(H, 6, dtype=dtype, g=g), num_buckets=6, max_distance=8)}
    if name == "t5_uni":
        return {"relative_bias": RelativeBias("t5", _rand(H, 6, dtype=dtype, g=g), num_buckets=6, max_distance=8, bidirectional=False)}
    if name == "alibi":
        return {"relative_bias": RelativeBias("alibi", _rand(H, dtype=dtype, g=g).abs(), max_distance=8)}
    raise KeyError(name)


VARIANTS = ["standard", "local", "strided", "fixed", "block", "shaw", "shaw_heads", "t5", "t5_uni", "alibi"]


def _inputs(B, H, Hkv, Tq, Tk, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _rand(B, H, Tq, d, dtype=dtype, g=g), _rand(B, Hkv, Tk, d, dtype=dtype, g=g), _rand(B, Hkv, Tk, d, dtype=dtype, g=g)
    return q, k, v, g


def _padding(B, Tk, g):
    m = torch.rand(B, Tk, generator=g) > 0.35
    m[:, 0] = False  # a padded first key: its query must still attend to itself
    return m


def _grads(fn, q, k, v, kw, w):
    """Output and gradients wrt q, k, v and a relative table (when present)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    kw = dict(kw)
    if kw.get("relative_bias") is not None:
        rel = kw["relative_bias"]
        t = rel.table.detach().clone().requires_grad_()
        kw["relative_bias"] = RelativeBias(rel.kind, t, rel.max_distance, rel.num_buckets, rel.bidirectional)
        leaves.append(t)
    out = fn(q, k, v, **kw)
    gs = torch.autograd.grad((out * w).sum(), leaves)
    return [out.detach(), *gs]


def _blockwise(bq=3, bk=3):
    return lambda q, k, v, **kw: attention(q, k, v, backend="blockwise", block_q=bq, block_k=bk, **kw)


def _close(xs, ys, tol):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_blockwise_equals_math_equals_naive_float64(variant, causal, padding):
    q, k, v, g = _inputs(2, 2, 1, 7, 8, 3)  # GQA 2:1, q_len < k_len (bottom-right), T not a tile multiple
    kw = dict(_variant(variant, 2, 3, g), causal=causal)
    if padding:
        kw["key_padding_mask"] = _padding(2, 8, g)
    w = _rand(2, 2, 7, 3, g=g)
    ref = _grads(naive, q, k, v, kw, w)
    _close(_grads(reference, q, k, v, kw, w), ref, 1e-10)
    _close(_grads(_blockwise(3, 3), q, k, v, kw, w), ref, 1e-10)
    _close(_grads(_blockwise(2, 5), q, k, v, kw, w), ref, 1e-10)


def _as64(kw):
    kw = dict(kw)
    rel = kw.get("relative_bias")
    if rel is not None:
        kw["relative_bias"] = RelativeBias(rel.kind, rel.table.double(), rel.max_distance, rel.num_buckets, rel.bidirectional)
    return kw


@pytest.mark.parametrize("variant", ["standard", "local", "strided", "shaw", "t5", "alibi"])
def test_blockwise_float32_against_float64_naive(variant):
    q, k, v, g = _inputs(2, 4, 2, 9, 10, 4, dtype=torch.float32)
    kw = dict(_variant(variant, 4, 4, g, dtype=torch.float32), causal=True, key_padding_mask=_padding(2, 10, g))
    w = _rand(2, 4, 9, 4, g=g, dtype=torch.float32)
    got = _grads(_blockwise(4, 3), q, k, v, kw, w)
    want = _grads(naive, q.double(), k.double(), v.double(), _as64(kw), w.double())
    for x, y in zip(got, want, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


@given(
    data=st.data(),
    Tq=st.integers(1, 11),
    extra=st.integers(0, 3),
    d=st.integers(1, 5),
    Hkv=st.integers(1, 2),
    rep=st.sampled_from([1, 2, 3]),
    bq=st.integers(1, 6),
    bk=st.integers(1, 6),
    causal=st.booleans(),
    pad=st.booleans(),
)
def test_blockwise_property(data, Tq, extra, d, Hkv, rep, bq, bk, causal, pad):
    """Random shapes (T rarely a tile multiple), tiles, GQA ratios, windows, strides, variants."""
    Tk, H = Tq + extra, Hkv * rep
    q, k, v, g = _inputs(2, H, Hkv, Tq, Tk, d, seed=data.draw(st.integers(0, 10**6)))
    kind = data.draw(st.sampled_from(["none", "window", "strided", "fixed", "shaw", "t5", "alibi"]))
    kw = {"causal": causal}
    if kind == "window":
        kw["window"] = data.draw(st.integers(1, Tk + 1))
    elif kind == "strided":
        kw["sparsity"] = Sparsity("strided", stride=data.draw(st.integers(1, 5)))
    elif kind == "fixed":
        s = data.draw(st.integers(1, 5))
        kw["sparsity"] = Sparsity("fixed", stride=s, summary=data.draw(st.integers(1, s)))
    elif kind == "shaw":
        K = data.draw(st.integers(1, 4))
        kw["relative_bias"] = RelativeBias("shaw", _rand(2 * K + 1, d, g=g), max_distance=K)
    elif kind == "t5":
        kw["relative_bias"] = RelativeBias("t5", _rand(H, 8, g=g), num_buckets=8, max_distance=6, bidirectional=data.draw(st.booleans()))
    elif kind == "alibi":
        kw["relative_bias"] = RelativeBias("alibi", _rand(H, g=g).abs())
    if pad:
        kw["key_padding_mask"] = torch.rand(2, Tk, generator=g) > 0.5
    w = _rand(2, H, Tq, d, g=g)
    _close(_grads(_blockwise(bq, bk), q, k, v, kw, w), _grads(naive, q, k, v, kw, w), 1e-10)


def test_padded_query_attends_to_itself_only_when_all_keys_padded():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 2)
    kpm = torch.tensor([[False, False, False, False]])
    out = attention(q, k, v, key_padding_mask=kpm, backend="blockwise", block_q=2, block_k=2)
    torch.testing.assert_close(out, v)  # every row reads only its own key


def test_block_sparse_skips_empty_tiles_and_matches():
    T, b = 12, 4
    layout = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    sp = Sparsity("block", block_size=b, layout=layout)
    o = Opts(False, None, sp, None, 1, 1, True, 1.0, b, b)
    visited = [[t.ks for t in key_tiles(o, T, T, qs, qs + b, False, "cpu")] for qs in range(0, T, b)]
    assert visited == [[0], [4], [0, 8]]
    q, k, v, g = _inputs(1, 2, 2, T, T, 3)
    w = _rand(1, 2, T, 3, g=g)
    _close(_grads(_blockwise(b, b), q, k, v, {"sparsity": sp}, w), _grads(naive, q, k, v, {"sparsity": sp}, w), 1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_visits_only_the_band(causal):
    """Key tiles outside the window are skipped from positions alone: O(T/block) tiles per query tile."""
    T, b, w = 1024, 64, 100
    o = Opts(causal, w, None, None, 1, 1, True, 1.0, b, b)
    counts = [len(list(key_tiles(o, T, T, qs, min(qs + b, T), False, "cpu"))) for qs in range(0, T, b)]
    bound = math.ceil((w - 1) / b) + 1 if causal else 2 * math.ceil((w - 1) / b) + 1
    assert max(counts) <= bound and sum(counts) <= (T // b) * bound < (T // b) ** 2 // 2


def test_saves_only_linear_memory():
    """The Function saves inputs, out and lse: nothing with a T×T footprint."""
    T = 64
    q, k, v = (torch.randn(1, 2, T, 4, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, causal=True, backend="blockwise", block_q=16, block_k=16)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert saved and max(t.numel() for t in saved) <= 2 * T * 4
    assert sum(t.numel() for t in saved) <= 5 * 2 * T * 4


def test_t5_bucket_matches_transformers():
    T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    rel = torch.arange(-300, 301)[None, :]
    for bidi in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            want = T5Attention._relative_position_bucket(rel, bidirectional=bidi, num_buckets=nb, max_distance=md)
            got = A.t5_bucket(rel, bidirectional=bidi, num_buckets=nb, max_distance=md)
            assert torch.equal(got, want)


# ------------------------------------------------------------------ transforms
@pytest.mark.parametrize("variant", ["standard", "local", "block", "shaw_heads", "t5", "alibi"])
def test_gradcheck_forward_ad_batched_and_gradgrad(variant):
    q, k, v, g = _inputs(1, 2, 1, 5, 6, 2)
    kw = dict(_variant(variant, 2, 2, g), causal=True, key_padding_mask=torch.tensor([[True, False, True, True, True, False]]))
    rel = kw.pop("relative_bias", None)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    if rel is not None:
        inputs.append(rel.table.clone().requires_grad_())

    def f(q, k, v, table=None):
        r = None if rel is None else RelativeBias(rel.kind, table, rel.max_distance, rel.num_buckets, rel.bidirectional)
        return attention(q, k, v, relative_bias=r, backend="blockwise", block_q=2, block_k=4, **kw)

    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("variant", ["standard", "shaw", "t5"])
def test_vmap_grad_blockwise_equals_math(variant):
    q, k, v, g = _inputs(3, 2, 2, 6, 6, 3)  # vmap over the batch of 3
    rel = _variant(variant, 2, 3, g).get("relative_bias")
    kpm = _padding(3, 6, g)

    def loss(backend):
        def L(q, k, v, m, table):
            r = None if rel is None else RelativeBias(rel.kind, table, rel.max_distance, rel.num_buckets, rel.bidirectional)
            o = attention(q[None], k[None], v[None], causal=True, key_padding_mask=m[None], relative_bias=r,
                          backend=backend, block_q=4, block_k=4)
            return (o.sin()).sum()
        return L

    table = torch.zeros(1, dtype=F64) if rel is None else rel.table
    in_dims = (0, 0, 0, 0, None)
    gb = vmap(grad(loss("blockwise"), argnums=(0, 1, 2, 4)), in_dims=in_dims)(q, k, v, kpm, table)
    gm = vmap(grad(loss("math"), argnums=(0, 1, 2, 4)), in_dims=in_dims)(q, k, v, kpm, table)
    _close(gb[:3], gm[:3], 1e-10)
    if rel is not None:
        _close(gb[3:], gm[3:], 1e-10)  # per-example table gradients


def test_jvp_and_hvp_blockwise_equal_math():
    q, k, v, g = _inputs(1, 2, 1, 6, 6, 3)
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    f = lambda be: (lambda q, k, v: attention(q, k, v, causal=True, window=4, backend=be, block_q=4, block_k=2))
    _close(jvp(f("blockwise"), (q, k, v), (tq, tk, tv)), jvp(f("math"), (q, k, v), (tq, tk, tv)), 1e-10)
    L = lambda be: (lambda q, k, v: (f(be)(q, k, v) ** 2).sum())
    hb = jvp(grad(L("blockwise"), argnums=(0, 1, 2)), (q, k, v), (tq, tk, tv))[1]
    hm = jvp(grad(L("math"), argnums=(0, 1, 2)), (q, k, v), (tq, tk, tv))[1]
    _close(hb, hm, 1e-10)


def test_auto_uses_a_forward_ad_capable_path():
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 3)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    got = jvp(lambda q, k, v: attention(q, k, v, causal=True), (q, k, v), t)
    want = jvp(lambda q, k, v: reference(q, k, v, causal=True), (q, k, v), t)
    _close(got, want, 1e-10)


def test_auto_under_vmap_matches_math():
    q, k, v, _ = _inputs(4, 2, 2, 5, 5, 3)
    f = lambda be: vmap(grad(lambda q, k, v: attention(q[None], k[None], v[None], causal=True, backend=be).sum(), argnums=(0, 1)))
    _close(f("auto")(q, k, v), f("math")(q, k, v), 1e-10)


def _fd_check(loss, params, tangent, eps=1e-5, tol=1e-6):
    flat = aam_func.tree
    value, deriv = jvp(loss, (params,), (tangent,))
    plus = loss(flat.map(lambda p, t: p + eps * t, params, tangent))
    minus = loss(flat.map(lambda p, t: p - eps * t, params, tangent))
    return deriv, (plus - minus) / (2 * eps)


@pytest.mark.parametrize("attention_type", ["standard", "relative"])
def test_transformer_jvp_and_hvp_match_finite_differences(attention_type):
    cfg = aam_func.ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.0,
                               attention_backend="blockwise", attention_type=attention_type, max_relative_position=3)
    model = aam_func.Transformer(cfg)
    params = aam_func.tree.cast(model.init(seed=0), F64)
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = lambda p: model.apply(p, ids, labels=ids)["loss"]
    g = torch.Generator().manual_seed(2)
    tangent = aam_func.tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)
    deriv, fd = _fd_check(loss, params, tangent)
    torch.testing.assert_close(deriv, fd, rtol=1e-6, atol=1e-7)
    # hvp = jvp(grad(loss)), against central differences of the gradient
    gradf = grad(loss)
    _, hvp = jvp(gradf, (params,), (tangent,))
    eps = 1e-5
    gp = gradf(aam_func.tree.map(lambda p, t: p + eps * t, params, tangent))
    gm = gradf(aam_func.tree.map(lambda p, t: p - eps * t, params, tangent))
    fd_h = aam_func.tree.map(lambda a, b: (a - b) / (2 * eps), gp, gm)
    for a, b in zip(aam_func.tree.leaves(hvp), aam_func.tree.leaves(fd_h), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention_type", ["standard", "relative", "local", "sparse"])
def test_model_blockwise_equals_math(attention_type):
    kw = dict(vocab_size=13, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=24, dropout=0.0,
              attention_type=attention_type, max_relative_position=4)
    ids = torch.randint(0, 13, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :5] = False
    outs = []
    for backend in ("blockwise", "math"):
        model = aam_func.Transformer(aam_func.ModelConfig(attention_backend=backend, **kw))
        params = aam_func.tree.cast(model.init(seed=0), F64)
        outs.append(model.apply(params, ids, attention_mask=mask)["logits"])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_low_precision_accumulates_in_float32():
    q, k, v, _ = _inputs(1, 2, 2, 20, 20, 8, dtype=torch.float32)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, backend="blockwise", block_q=8, block_k=8)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference(q, k, v, causal=True), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------ dispatch and errors
def test_dropout_on_blockwise_falls_back_to_math_with_a_warning():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 2)
    with pytest.warns(UserWarning, match="no attention dropout"):
        a = attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(0), backend="blockwise")
    b = reference(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_xformers_missing_names_the_package():
    try:
        import xformers  # noqa: F401
    except ImportError:
        q, k, v, _ = _inputs(1, 1, 1, 4, 4, 2)
        with pytest.raises(ImportError, match="xformers"):
            attention(q, k, v, backend="xformers")
    else:
        pytest.skip("xformers is installed")


def _qkv(B=1, H=2, T=4, d=4, Hkv=None, dk=None):
    return torch.randn(B, H, T, d), torch.randn(B, Hkv or H, T, dk or d), torch.randn(B, Hkv or H, T, dk or d)


@pytest.mark.parametrize(
    "make, kwargs, exc, match",
    [
        (lambda: _qkv(dk=3), {}, ValueError, "head dims differ"),
        (lambda: _qkv(H=3, Hkv=2), {}, ValueError, "multiple of kv heads"),
        (lambda: _qkv(), {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, ValueError, r"shape \(batch, k_len\)"),
        (lambda: _qkv(), {"key_padding_mask": torch.ones(1, 4)}, TypeError, "bool"),
        (lambda: _qkv(), {"window": 0}, ValueError, r"window must be an int >= 1"),
        (lambda: _qkv(), {"window": -2}, ValueError, r"window must be an int >= 1"),
        (lambda: _qkv(), {"backend": "flash3"}, ValueError, "backend must be one of"),
        (lambda: _qkv(), {"block_q": 0}, ValueError, r"block_q must be an int >= 1"),
        (lambda: _qkv(), {"relative_bias": RelativeBias("shaw", torch.randn(4, 4), max_distance=2)}, ValueError, "shaw table"),
        (lambda: _qkv(), {"relative_bias": RelativeBias("t5", torch.randn(2, 5), num_buckets=4)}, ValueError, "t5 table"),
        (lambda: _qkv(), {"relative_bias": RelativeBias("alibi", torch.randn(3))}, ValueError, "alibi table"),
        (lambda: _qkv(), {"relative_bias": RelativeBias("alibi", torch.randn(2)), "backend": "sdpa"}, ValueError, "sdpa"),
        (lambda: _qkv(), {"scale": 0.0}, ValueError, r"scale must be a finite number > 0"),
        (lambda: _qkv(), {"scale": True}, TypeError, "scale must be"),
        (lambda: _qkv(), {"dropout_p": 1.0}, ValueError, r"dropout_p must be a finite number in \[0, 1\)"),
        (lambda: _qkv(), {"q_offset": 1.5, "backend": "math"}, TypeError, "q_offset must be an int"),
        (lambda: _qkv(), {"relative_bias": "alibi"}, TypeError, "relative_bias must be a RelativeBias"),
        (lambda: _qkv(), {"sparsity": "strided"}, TypeError, "sparsity must be a Sparsity"),
        (lambda: _qkv(), {"dropout_p": 0.1, "backend": "sdpa"}, ValueError, r"sdpa.*dropout_p > 0"),
        (lambda: (lambda q, k, v: (q, k, v.double()))(*_qkv()), {"backend": "sdpa"}, ValueError, r"sdpa.*dtypes differ"),
    ],
)
def test_bad_input_errors(make, kwargs, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        attention(q, k, v, **{"backend": "blockwise", **kwargs})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Sparsity("dilated", stride=2), "pattern must be"),
        (lambda: Sparsity("strided", stride=0), r"sparsity stride must be an int >= 1"),
        (lambda: Sparsity("fixed", stride=4, summary=5), "summary"),
        (lambda: Sparsity("block", block_size=2), "layout"),
        (lambda: RelativeBias("rotary", torch.zeros(2)), "kind must be"),
    ],
)
def test_bad_pattern_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_blockwise_under_cpu_bf16_autocast_matches_fp32(input_dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, requires_grad=True) for _ in range(3))

    def run(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = attention(q.to(input_dtype), k.to(input_dtype), v.to(input_dtype), causal=True,
                          backend="blockwise", block_q=16, block_k=16)
        return torch.autograd.grad(o.float().square().sum(), (q, k, v))

    ref = run(False)
    got = run(True)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_auto_under_cpu_bf16_autocast_with_grad_equals_math(name, causal):
    """Under CPU bf16 autocast with a gradient ``auto`` takes a dense path (the additive-bias
    ``baddbmm`` form when there is no relative bias or padding). Against float64, its values and
    gradients are as accurate as the math path's under the same autocast (both round to bf16 in
    different places), for every variant, with GQA. (It once dropped the relative bias there.)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 9, 8, generator=g, dtype=F64, requires_grad=True) for i in range(3))
    kw = _variant(name, 4, 8, g)

    def run(backend, autocast):
        args = [x.float() if autocast else x for x in (q, k, v)]
        kw_ = {n: (RelativeBias(b.kind, b.table.float(), max_distance=b.max_distance, num_buckets=b.num_buckets,
                                bidirectional=b.bidirectional) if autocast and isinstance(b, RelativeBias) else b)
               for n, b in kw.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = attention(*args, causal=causal, backend=backend, **kw_)
        return [o.double(), *(x.double() for x in torch.autograd.grad(o.float().square().sum(), (q, k, v)))]

    exact = run("math", False)
    err = lambda got: max(((a - b).norm() / b.norm()).item() for a, b in zip(got, exact))  # noqa: E731
    e_auto, e_math = err(run("auto", True)), err(run("math", True))
    assert e_auto < 0.05 and e_auto <= 2 * e_math + 1e-3, (e_auto, e_math)
