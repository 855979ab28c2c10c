"""Attention behaviour that the full mutation campaign found unchecked (issue 17): defaults,
shapes and boundary cases of ``ops.attention``, each checked against a formula or convention
written out here rather than against the library's own reference."""

import functools
import math

import pytest
import torch

from aam_func.ops.attention import Sparsity, allowed_mask, attention, mods


def _qkv(B=1, H=2, Tq=5, Tk=5, d=4, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Tq, d), r(B, Hkv or H, Tk, d), r(B, Hkv or H, Tk, d)


def _formula(q, k, v, allowed, scale=None):
    """softmax(scale · q kᵀ, −∞ where not allowed) v, GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


# ------------------------------------------------------------------ masks: the sparse patterns


def test_fixed_sparsity_default_summary_is_one_key_per_block():
    """Child et al.'s fixed pattern with the default summary c = 1: a query reads its own block
    and the last position of every block (j % l == l - 1), plus the diagonal."""
    T, l = 9, 3
    sp = Sparsity("fixed", stride=l)
    assert sp.summary == 1
    pos = torch.arange(T)
    i, j = pos[:, None], pos[None, :]
    want = (i // l == j // l) | (j % l == l - 1) | (i == j)
    assert torch.equal(allowed_mask(pos, pos, sparsity=sp), want)
    q, k, v = _qkv(Tq=T, Tk=T)
    for backend in ("math", "blockwise"):
        out = attention(q, k, v, sparsity=sp, backend=backend, block_q=4, block_k=4)
        torch.testing.assert_close(out, _formula(q, k, v, want), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ mods: document helpers


def test_document_positions_accepts_any_leading_shape():
    """``document_positions`` takes ids shaped (…, T): one stream (T,), a batch (B, T), or more
    leading dims, each row restarting at 0 where its document id changes."""
    row = torch.tensor([0, 0, 1, 1, 1, 2])
    want = [0, 1, 0, 1, 2, 0]
    assert mods.document_positions(row).tolist() == want
    other = torch.tensor([5, 5, 5, 5, 7, 7])
    grid = torch.stack([torch.stack([row, other]), torch.stack([other, row]), torch.stack([row, row])])  # (3, 2, 6)
    got = mods.document_positions(grid)
    assert got.shape == grid.shape
    assert got[0, 0].tolist() == want and got[0, 1].tolist() == [0, 1, 2, 3, 0, 1]
    assert got[1, 0].tolist() == [0, 1, 2, 3, 0, 1] and got[2, 1].tolist() == want


def test_sinks_reads_the_first_keys_and_a_causal_window():
    """``sinks(n, w)``: query i reads the w most recent keys (0 <= i - j < w) and each of the
    first n keys up to itself (j < n and j <= i); w = 0 leaves the sinks alone."""
    T = 8
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for n, w in ((2, 3), (3, 1), (2, 0)):
        want = ((i - j >= 0) & (i - j < w)) | ((j < n) & (j <= i))
        got = mods.sinks(n, w)(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                               i[None, None], j[None, None])
        assert torch.equal(got[0, 0], want), (n, w)
    q, k, v = _qkv(Tq=T, Tk=T)
    want = ((i - j >= 0) & (i - j < 3)) | ((j < 2) & (j <= i))
    for backend in ("math", "blockwise"):
        out = attention(q, k, v, mask_mod=mods.sinks(2, 3), backend=backend, block_q=3, block_k=3)
        torch.testing.assert_close(out, _formula(q, k, v, want), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ mods: signatures


def _probe_qkv():
    return _qkv(Tq=4, Tk=4)


def test_mods_with_varargs_or_var_keywords_are_accepted():
    """A mod written as ``f(*args)`` or with extra ``**kwargs`` can be called with FlexAttention's
    positional arguments, so it is accepted (and gives the plain result when it changes nothing)."""
    q, k, v = _probe_qkv()
    plain = attention(q, k, v, causal=True, backend="math")
    for sm in (lambda *a: a[0], lambda score, *rest: score, lambda score, b, h, q_idx, kv_idx, **kw: score):
        torch.testing.assert_close(attention(q, k, v, causal=True, score_mod=sm, backend="math"), plain)
    everything = lambda b, h, q_idx, kv_idx, **kw: q_idx >= 0  # noqa: E731
    for mm in (lambda *a: a[2] >= 0, everything):
        torch.testing.assert_close(attention(q, k, v, causal=True, mask_mod=mm, backend="math"), plain)


def test_mods_with_a_required_keyword_only_argument_are_refused():
    """A required keyword-only parameter cannot be filled by FlexAttention's positional call: refused
    by name before any kernel runs; an optional one is fine."""
    q, k, v = _probe_qkv()

    def sm(score, b, h, q_idx, kv_idx, *, temperature):
        return score / temperature

    def mm(b, h, q_idx, kv_idx, *, lag):
        return kv_idx <= q_idx - lag

    with pytest.raises(TypeError, match="score_mod must take 5 positional arguments"):
        attention(q, k, v, score_mod=sm, backend="math")
    with pytest.raises(TypeError, match="mask_mod must take 4 positional arguments"):
        attention(q, k, v, mask_mod=mm, backend="math")

    def sm_opt(score, b, h, q_idx, kv_idx, *, temperature=2.0):
        return score / temperature

    want = _formula(q, k, v, torch.ones(4, 4, dtype=torch.bool), scale=0.25)  # 1/sqrt(4) / 2
    torch.testing.assert_close(attention(q, k, v, score_mod=sm_opt, backend="math"), want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ mods: captured tensors


def _holder(*args, **kwargs):  # a plain function a functools.partial can hold tensors for
    return args, kwargs


# one nesting step per kind: (wrap, unwrap, container levels the step adds)
class _Box:  # a callable object holding what it wraps as an attribute
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args):
        return self.inner


_NEST = {
    "object": (_Box, lambda x: x.inner, 1),
    "object_list": (lambda x: _Box([x]), lambda x: x.inner[0], 2),  # an object, the list in its attribute
    "list": (lambda x: [x], lambda x: x[0], 1),
    "tuple": (lambda x: (x,), lambda x: x[0], 1),
    "dict": (lambda x: {"inner": x}, lambda x: x["inner"], 1),
    "partial_args": (lambda x: functools.partial(_holder, x), lambda x: x.args[0], 2),  # partial, its args tuple
    "partial_keywords": (lambda x: functools.partial(_holder, inner=x), lambda x: x.keywords["inner"], 2),
}  # and "partial_func" below


def _returns(x):
    def f(*args, **kwargs):
        return x
    return f


_NEST["partial_func"] = (lambda x: functools.partial(_returns(x)), lambda x: x.func(), 2)  # partial, its function


def _nested_bias_mod(table, kind: str, levels: int):
    """A score_mod adding ``table[kv_idx]`` with the table inside nested containers of one kind,
    the deepest container about ``levels`` levels below the mod (the mod is level 0, its
    closure's value level 1)."""
    wrap, unwrap, step = _NEST[kind]
    box = table
    for _ in range(levels // step):
        box = wrap(box)

    def score_mod(score, b, h, q_idx, kv_idx):
        x = box
        while not isinstance(x, torch.Tensor):
            x = unwrap(x)
        return score + x[kv_idx]

    return score_mod


def _table_grads(sm, table):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64)
    out = []
    for backend in ("blockwise", "math"):
        o = attention(q, k, v, causal=True, score_mod=sm, backend=backend, block_q=2, block_k=2)
        out.append(torch.autograd.grad((o * w).sum(), table, allow_unused=True, materialize_grads=True)[0])
    return out


@pytest.mark.parametrize("kind", ["object", "object_list", "list", "tuple", "dict", "partial_args", "partial_keywords",
                                  "partial_func"])
def test_a_captured_table_gets_its_gradient_through_every_container(kind):
    """Closures, callable objects' attributes, lists, tuples, dicts and functools.partial (its function, args and keywords): a
    learned table held in any of them gets the math path's gradient from the blockwise kernel,
    near the surface and a few levels below the walk's depth limit."""
    from aam_func.ops.attention.mods import _WALK_DEPTH

    for levels in (2, _WALK_DEPTH - 4):
        table = torch.randn(4, dtype=torch.float64, requires_grad=True)
        sm = _nested_bias_mod(table, kind, levels)
        assert [t is table for t in mods.captured_tensors(sm)] == [True]
        blockwise, math_ = _table_grads(sm, table)
        assert blockwise.abs().max() > 1e-3
        torch.testing.assert_close(blockwise, math_, atol=1e-12, rtol=1e-12)


# (a chain of callable objects alone is followed to any depth: it misses no tensor)
@pytest.mark.parametrize("kind", ["object_list", "list", "tuple", "dict", "partial_args", "partial_keywords", "partial_func"])
def test_nesting_past_the_walk_depth_is_refused_whatever_the_container(kind):
    from aam_func.ops.attention.mods import _WALK_DEPTH

    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"nested more than {_WALK_DEPTH} levels deep"):
        attention(q, q, q, causal=True, score_mod=_nested_bias_mod(table, kind, _WALK_DEPTH + 4), backend="blockwise")


# ------------------------------------------------------------------ backends: xformers, flex


class _TopLeftCausal:  # xformers' LowerTriangularMask: key j <= query i, rows counted from the top
    pass


class _BottomRightCausal:  # xformers' LowerTriangularFromBottomRightMask: j <= i + (N - M)
    pass


def _fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' documented contract: (batch, seq, heads, head_dim) tensors, one head count."""
    assert query.dim() == key.dim() == value.dim() == 4
    B, M, H, K = query.shape
    N = key.shape[1]
    assert key.shape == (B, N, H, K) and value.shape[:3] == (B, N, H), (query.shape, key.shape, value.shape)
    s = torch.einsum("bmhk,bnhk->bhmn", query, key) * (K ** -0.5 if scale is None else scale)
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    if isinstance(attn_bias, _TopLeftCausal):
        s = s.masked_fill(j > i, float("-inf"))
    elif isinstance(attn_bias, _BottomRightCausal):
        s = s.masked_fill(j > i + (N - M), float("-inf"))
    else:
        assert attn_bias is None
    return torch.einsum("bhmn,bnhk->bmhk", torch.softmax(s, -1), value)


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in for the xformers package (not installed here) that follows its API."""
    import sys
    import types

    pkg, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.LowerTriangularMask = _TopLeftCausal
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=_BottomRightCausal))
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


# (H, Hkv, Tq, Tk, d): square, bottom-right causal with Tq < Tk, GQA, and head dims that equal a
# sequence length (so that a length read from the wrong axis changes the result)
_XF_SHAPES = [(2, 2, 5, 5, 4), (4, 2, 3, 6, 4), (2, 1, 3, 4, 4), (4, 1, 4, 6, 4), (3, 3, 2, 5, 2)]


@pytest.mark.parametrize("shape", _XF_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_backend_passes_its_layout_and_causal_alignment(fake_xformers, shape, causal):
    H, Hkv, Tq, Tk, d = shape
    q, k, v = _qkv(B=2, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, d=d)
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    allowed = j <= Tk - Tq + i if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    out = attention(q, k, v, causal=causal, backend="xformers")
    torch.testing.assert_close(out, _formula(q, k, v, allowed), rtol=1e-10, atol=1e-10)
    out = attention(q, k, v, causal=causal, backend="xformers", scale=0.3)
    torch.testing.assert_close(out, _formula(q, k, v, allowed, scale=0.3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(window=2), dict(sparsity=Sparsity("strided", stride=2)),
                                dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool))])
def test_xformers_backend_refuses_masks_it_cannot_run(fake_xformers, kw):
    q, k, v = _qkv(B=1, Tq=5, Tk=5)
    with pytest.raises(ValueError, match="backend='xformers' supports standard"):
        attention(q, k, v, causal=True, backend="xformers", **kw)


def test_flex_available_follows_whether_flex_attention_imports(monkeypatch):
    """The FlexAttention route is considered only where ``torch.nn.attention.flex_attention``
    imports (torch 2.5 on)."""
    import importlib.util
    import sys

    from aam_func.ops.attention import backends

    assert backends._flex_available() is (importlib.util.find_spec("torch.nn.attention.flex_attention") is not None)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # an import of it now fails
    assert backends._flex_available() is False


# ------------------------------------------------------------------ value objects and defaults


def _facts(**changes):
    from aam_func.ops.attention import backends

    base = dict(backend="auto", device="cpu", same_dtype=True, cpu_bf16_grad=False, compiling=False, forward_ad=False,
                vmap=False, q_offset=False, relative_bias=False, dropout=False, padding=False, window=False,
                sparsity=False, causal=True, q_len=4, k_len=4)
    return backends.CallFacts(**{**base, **changes})


def test_call_facts_default_to_a_call_without_mods_or_triton(monkeypatch):
    """The optional facts default to "absent": no Triton, no mods, no FlexAttention, and mods that
    are not a mask alone; a route table read from such facts treats the call accordingly."""
    from aam_func.ops.attention import backends

    f = _facts()
    assert (f.triton, f.mods, f.flex_available, f.mask_only) == (False, False, False, False)
    assert backends.choose_path(f).path == "sdpa"
    # mods given, nothing else said: a score_mod (not a mask alone) -> the blockwise kernel, on
    # the CPU (no dense-mask SDPA) and on CUDA (no FlexAttention unless it imports)
    assert backends.choose_path(_facts(mods=True)).path == "blockwise"
    assert backends.choose_path(_facts(mods=True, mask_only=True)).path == "sdpa"
    assert backends.choose_path(_facts(mods=True, device="cuda")).path == "blockwise"
    assert backends.choose_path(_facts(mods=True, device="cuda", flex_available=True)).path == "flex"
    # a CUDA call that needs the kernel: no Triton unless the facts say the package is there
    monkeypatch.setattr(backends, "TRITON_AUTO", True)
    assert backends.choose_path(_facts(device="cuda", window=True)).path == "blockwise"
    assert backends.choose_path(_facts(device="cuda", window=True, triton=True)).path == "triton"


def test_mask_only_mods_run_as_dense_sdpa_up_to_512_keys():
    """docs/attention.md: auto runs a mask_mod alone on the CPU as SDPA with the dense mask for
    Tk <= 512 (``backends.DENSE_MODS_MAX_LEN``), beyond that on the blockwise kernel."""
    from aam_func.ops.attention import backends

    short = dict(mods=True, mask_only=True, q_len=512, k_len=512)
    assert backends.choose_path(_facts(**short)).path == "sdpa"
    assert backends.choose_path(_facts(**dict(short, q_len=513, k_len=513))).path == "blockwise"


def test_call_facts_sparsity_and_relative_bias_are_immutable_hashable_values():
    """The route's facts and the mask / bias specs are values: frozen, equal when their fields are,
    and usable as dict keys (a cache keyed by the call's configuration)."""
    import dataclasses

    from aam_func.ops.attention import RelativeBias
    from aam_func.ops.attention.tiles import Opts

    table = torch.zeros(2, 32)
    opts = dict(causal=True, window=None, sparsity=None, rel_kind=None, max_distance=128, num_buckets=32,
                bidirectional=True, scale=0.5, block_q=2, block_k=2)
    pairs = [(_facts(), _facts()), (Sparsity("strided", stride=2), Sparsity("strided", stride=2)),
             (RelativeBias("t5", table), RelativeBias("t5", table)), (Opts(**opts), Opts(**opts))]
    for a, b in pairs:
        assert a == b and {a: 1}[b] == 1, type(a).__name__
        field = dataclasses.fields(a)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(a, field, getattr(a, field))


def test_block_mask_is_an_immutable_object_compared_by_identity():
    """A BlockMask holds tensors and a cache: it is frozen, hashable, and equal only to itself
    (two masks of the same mask_mod are different objects, each with its own cache)."""
    import dataclasses

    from aam_func.ops.attention import create_block_mask

    a = create_block_mask(mods.causal_mask, 1, 1, 8, 8, BLOCK_SIZE=4)
    b = create_block_mask(mods.causal_mask, 1, 1, 8, 8, BLOCK_SIZE=4)
    assert a == a and a != b and len({a, b, a}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.plan = b.plan


@pytest.mark.parametrize("kw, name", [(dict(pattern="strided"), "stride"), (dict(pattern="fixed"), "stride"),
                                      (dict(pattern="block", layout=torch.ones(2, 2, dtype=torch.bool)), "block_size")])
def test_sparsity_needs_its_sizes_given(kw, name):
    """A stride (strided / fixed) and a block size (block) have no meaningful default: leaving
    them out is refused, naming the missing size."""
    with pytest.raises(ValueError, match=name):
        Sparsity(**kw)


def _t5_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """T5's bidirectional bucket of one offset j - i (Raffel et al. 2020; mesh-tensorflow), in
    scalar arithmetic: half the buckets per sign, exact below n/2, log-spaced up to max_distance."""
    n = num_buckets // 2
    base = n if rel > 0 else 0
    rel, exact = abs(rel), n // 2
    if rel < exact:
        return base + rel
    return base + min(n - 1, exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (n - exact)))


def test_relative_bias_t5_defaults_are_t5s():
    """``RelativeBias("t5", table)`` uses T5's own defaults (Raffel et al. 2020, and transformers'
    T5Config: 32 buckets, max distance 128; bidirectional, as in the encoder), and its logits
    term is T5's bucket table."""
    from aam_func.ops.attention import RelativeBias

    nb, md = 32, 128
    H, T = 2, 40
    g = torch.Generator().manual_seed(5)
    table = torch.randn(H, nb, generator=g, dtype=torch.float64)
    rb = RelativeBias("t5", table)
    assert (rb.num_buckets, rb.max_distance, rb.bidirectional) == (nb, md, True)
    q, k, v = _qkv(H=H, Tq=T, Tk=T, d=2)
    bucket = torch.tensor([[_t5_bucket(j - i, nb, md) for j in range(T)] for i in range(T)])
    s = (q @ k.transpose(-1, -2)) / math.sqrt(2) + table[:, bucket]
    want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(attention(q, k, v, relative_bias=rb, backend="math"), want, rtol=1e-10, atol=1e-10)


def test_the_capture_walk_follows_100_levels():
    """docs/testing.md: the walk for captured tensors follows 100 levels and refuses deeper
    nesting (here: 100 nested lists are fine, 101 are refused)."""
    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    blockwise, math_ = _table_grads(_nested_bias_mod(table, "list", 100), table)
    torch.testing.assert_close(blockwise, math_, atol=1e-12, rtol=1e-12)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="nested more than 100 levels deep"):
        attention(q, q, q, causal=True, score_mod=_nested_bias_mod(table, "list", 101), backend="blockwise")


def test_rebind_with_nothing_to_replace_returns_the_mod_itself():
    """``rebind(mod, [], [])`` has nothing to look for: it returns the mod as it is, without
    walking it (so even a mod nested past the walk's depth comes back untouched), and no mod
    stays no mod."""
    table = torch.randn(4, dtype=torch.float64)
    deep = _nested_bias_mod(table, "list", 130)
    assert mods.rebind(deep, [], []) is deep
    assert mods.rebind(None, [table], [table.clone()]) is None


# ------------------------------------------------------------------ mods: the predefined mods' formulas


def _grid(B, H, Tq, Tk):
    from aam_func.ops.attention.mods import index_grid

    return index_grid(B, H, Tq, Tk, "cpu")


def test_mask_combinators_and_prefix_lm_follow_their_formulas():
    """or_masks / and_masks of three masks, and prefix-LM with an int or a per-example length:
    each against its rule written over the (b, h, i, j) grid."""
    B, H, T = 2, 1, 7
    b, h, i, j = _grid(B, H, T, T)
    causal = j <= i
    even = lambda b, h, i, j: (j % 2) == 0  # noqa: E731
    near = lambda b, h, i, j: (i - j).abs() <= 1  # noqa: E731
    three = (mods.causal_mask, even, near)
    assert torch.equal(mods.or_masks(*three)(b, h, i, j).expand(B, H, T, T),
                       (causal | (j % 2 == 0) | ((i - j).abs() <= 1)).expand(B, H, T, T))
    assert torch.equal(mods.and_masks(*three)(b, h, i, j).expand(B, H, T, T),
                       (causal & (j % 2 == 0) & ((i - j).abs() <= 1)).expand(B, H, T, T))
    assert torch.equal(mods.prefix_lm(3)(b, h, i, j).expand(B, H, T, T), (causal | (j < 3)).expand(B, H, T, T))
    n = torch.tensor([0, 5])
    got = mods.prefix_lm(n)(b, h, i, j).expand(B, H, T, T)
    assert torch.equal(got[0, 0], causal[0, 0]) and torch.equal(got[1, 0], (causal | (j < 5))[0, 0])


def test_predefined_score_mods_follow_their_formulas():
    """relative_table adds table[h, clip(j − i, −K, K) + K]; softcap is cap · tanh(s / cap);
    compose_scores applies its mods left to right."""
    B, H, T, K = 1, 2, 6, 2
    b, h, i, j = _grid(B, H, T, T)
    g = torch.Generator().manual_seed(7)
    score = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 4
    table = torch.randn(H, 2 * K + 1, generator=g, dtype=torch.float64)
    idx = (j - i).clamp(-K, K) + K
    want_rel = score + table[h, idx]
    torch.testing.assert_close(mods.relative_table(table, K)(score, b, h, i, j), want_rel, rtol=0, atol=1e-15)
    cap = 1.5
    torch.testing.assert_close(mods.softcap(cap)(score, b, h, i, j), cap * torch.tanh(score / cap), rtol=0, atol=1e-15)
    both = mods.compose_scores(mods.relative_table(table, K), mods.softcap(cap))(score, b, h, i, j)
    torch.testing.assert_close(both, cap * torch.tanh(want_rel / cap), rtol=0, atol=1e-15)
    other = mods.compose_scores(mods.softcap(cap), mods.relative_table(table, K))(score, b, h, i, j)
    torch.testing.assert_close(other, cap * torch.tanh(score / cap) + table[h, idx], rtol=0, atol=1e-15)


def test_mask_only_mods_on_the_cpu_take_dense_sdpa_only_where_it_serves_the_call():
    """auto with a mask_mod alone, on the CPU, at Tk <= 512: SDPA with the dense mask (math under
    CPU bf16 autocast with a gradient); the blockwise kernel wherever SDPA does not serve the call
    (forward AD, vmap, compile, relative bias, mixed dtypes), for a score_mod, or when asked."""
    from aam_func.ops.attention import backends

    base = dict(mods=True, mask_only=True, q_len=16, k_len=16)
    route = lambda **kw: backends.choose_path(_facts(**{**base, **kw})).path  # noqa: E731
    assert route() == "sdpa"
    assert route(causal=False, padding=True, window=True, sparsity=True) == "sdpa"  # the menu's masks join the mask
    assert route(cpu_bf16_grad=True) == "math"
    for why in (dict(forward_ad=True), dict(vmap=True), dict(compiling=True), dict(relative_bias=True),
                dict(same_dtype=False), dict(mask_only=False), dict(backend="blockwise"), dict(device="cuda")):
        assert route(**why) == "blockwise", why


@pytest.mark.parametrize("causal, T", [(True, 5), (False, 4)])  # T = 4 = H: no length read as a head count
@pytest.mark.parametrize("backend", ["auto", "math", "blockwise"])
def test_a_row_one_head_empties_gives_zero_there_and_attention_elsewhere(backend, causal, T):
    """A mask_mod that leaves query 1 of head 0 no key (FlexAttention's convention: output 0 and
    gradient 0 there), under grouped-query attention: every other row of every head is plain
    (causal or full) attention, so in the full case every (query, key) pair is allowed by some
    head. On the CPU ``auto`` runs this short mask-only call as SDPA with the dense mask;
    ``math`` and ``blockwise`` must agree with it."""
    B, H, Hkv, d = 2, 4, 2, 3
    q, k, v = (x.requires_grad_() for x in _qkv(B=B, H=H, Hkv=Hkv, Tq=T, Tk=T, d=d, seed=4))

    def mask(b, h, q_idx, kv_idx):
        return ((kv_idx <= q_idx) | (not causal)) & ~((h == 0) & (q_idx == 1))

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((j <= i) | (not causal)).expand(B, H, T, T).clone()
    allowed[:, 0, 1] = False
    rep = H // Hkv
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")).masked_fill(~allowed.any(-1, keepdim=True), 0.0), -1)
    want = (p * allowed.any(-1, keepdim=True)) @ v.repeat_interleave(rep, 1)
    out = attention(q, k, v, mask_mod=mask, backend=backend, block_q=2, block_k=2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[:, 0, 1], torch.zeros(B, d, dtype=out.dtype))
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[0][:, 0, 1], torch.zeros(B, d, dtype=out.dtype))


def test_block_sparsity_positions_past_the_layout_use_its_last_block():
    """``Sparsity("block")`` with a layout (q_blocks, k_blocks) smaller than the sequence: a
    position past the last block reads the layout's last row / column; the diagonal is always
    allowed. A non-square layout, so rows and columns cannot be swapped unseen."""
    b, T = 2, 7
    layout = torch.tensor([[True, False, False], [False, False, True]])  # (2, 3): blocks of 2 cover 4 x 6
    sp = Sparsity("block", block_size=b, layout=layout)
    pos = torch.arange(T)
    i, j = pos[:, None], pos[None, :]
    want = layout[(i // b).clamp(max=1), (j // b).clamp(max=2)] | (i == j)
    assert torch.equal(allowed_mask(pos, pos, sparsity=sp), want)
    q, k, v = _qkv(Tq=T, Tk=T)
    for backend in ("math", "blockwise"):
        out = attention(q, k, v, sparsity=sp, backend=backend, block_q=3, block_k=3)
        torch.testing.assert_close(out, _formula(q, k, v, want), rtol=1e-10, atol=1e-10)


def test_t5_buckets_with_few_buckets_follow_t5s_rule():
    """T5's bucket rule (Raffel et al. 2020; mesh-tensorflow's ``_relative_position_bucket``, as in
    transformers) at small bucket counts, where the exact range is a single offset (max_exact = 1)
    and the log-spaced buckets start at distance 1: offset j − i, per sign half the buckets when
    bidirectional, else only keys before the query; distances below max_exact exact, the rest
    max_exact + ⌊log(r / max_exact) / log(max_distance / max_exact) · (n − max_exact)⌋, at most n − 1."""
    from aam_func.ops.attention import t5_bucket

    rel = torch.arange(-12, 13)
    for bidirectional in (True, False):
        for nb in ((4, 6, 7, 8) if bidirectional else (2, 3, 4, 5)):
            for md in (2, 3, 4, 8):
                n = nb // 2 if bidirectional else nb
                base = (rel > 0).long() * n if bidirectional else torch.zeros_like(rel)
                r = rel.abs() if bidirectional else (-rel).clamp(min=0)
                exact = n // 2
                large = exact + (torch.log(r.float() / exact) / math.log(md / exact) * (n - exact)).long()
                want = base + torch.where(r < exact, r, large.clamp(max=n - 1))
                got = t5_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
                assert torch.equal(got, want), (bidirectional, nb, md)


@pytest.mark.parametrize("bidirectional, nb", [(True, 3), (True, 2), (False, 1)])
def test_t5_bias_with_too_few_buckets_is_refused_by_name(bidirectional, nb):
    """T5's rule needs at least one exact bucket (max_exact = n // 2 >= 1, n = num_buckets, halved
    when bidirectional); fewer used to fail deep inside with a bare ZeroDivisionError."""
    from aam_func.ops.attention import RelativeBias

    with pytest.raises(ValueError, match="num_buckets"):
        RelativeBias("t5", torch.zeros(2, nb), num_buckets=nb, bidirectional=bidirectional)
    RelativeBias("shaw", torch.zeros(5, 3), num_buckets=nb)  # the bucket count is T5's alone
