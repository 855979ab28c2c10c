"""The Triton attention backend against the dense reference, on the CPU under Triton's interpreter.

The package runs CPU tensors through an interpreted copy of its kernels (loaded with Triton's
interpreter switched on, ``TRITON_INTERPRET`` scoped to that load), so no environment variable
is needed here and a GPU run in the same process still compiles its own copy. The interpreter
is slow (tens of ms per program): shapes are tiny and the tiles (4 x 4) small enough that each
case spans several query and key tiles. Real shapes run in ``tests/test_cuda.py``.
Derivations: proofs/attention.md, section 8.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp, vmap

pytest.importorskip("triton", reason="the Triton backend needs the triton package (installed by the test extra)")

from aam_func.ops.attention import RelativeBias, Sparsity, attention, backends  # noqa: E402
from aam_func.ops.attention import reference  # noqa: E402
from aam_func.ops.attention.triton import attention_jvp, triton_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TILE = dict(block_q=4, block_k=4)
B, H, HKV, T, D = 1, 2, 1, 7, 3


def _r(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def _qkv(tq=T, tk=T, hkv=HKV, seed=0, b=B):
    return _r(b, H, tq, D, seed=seed), _r(b, hkv, tk, D, seed=seed + 1), _r(b, hkv, tk, D, seed=seed + 2)


_KPM = torch.tensor([[False, True, True, True, False, True, True]])
VARIANTS = {
    "full": dict(),
    "causal": dict(causal=True),
    "padding": dict(causal=True, key_padding_mask=_KPM),
    "padding_full": dict(key_padding_mask=_KPM),
    "window_causal": dict(causal=True, window=3),
    "window_symmetric": dict(window=2),
    "strided": dict(causal=True, sparsity=Sparsity("strided", stride=3)),
    "fixed": dict(sparsity=Sparsity("fixed", stride=4, summary=1)),
    "block": dict(sparsity=Sparsity("block", block_size=4, layout=torch.tensor([[1, 0], [0, 1]]).bool())),
    "scale": dict(causal=True, scale=0.3),
}


def _grads(out, xs, seed=5):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, xs, cot)


def _close(a, b, tol=1e-10):
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_reference(name):
    """Values and gradients of q, k, v (GQA: one kv head for two query heads) for every mask."""
    kw = VARIANTS[name]
    q, k, v = _qkv()
    out = triton_attention(q, k, v, **TILE, **kw)
    ref = reference(q, k, v, **kw)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)


def test_query_offset_and_short_queries_match_reference():
    """Queries at q_offset + i (a static cache), and the default bottom-right alignment (Tq < Tk)."""
    q, k, v = _qkv(tq=3)
    for kw in (dict(causal=True, q_offset=2), dict(causal=True, q_offset=torch.tensor(4)), dict(causal=True, window=4)):
        out, ref = triton_attention(q, k, v, **TILE, **kw), reference(q, k, v, **kw)
        _close(out, ref)
        for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            _close(a, b)


def _bias(kind, seed=7):
    if kind == "shaw":
        return RelativeBias("shaw", _r(5, D, seed=seed), max_distance=2)
    if kind == "shaw_per_head":
        return RelativeBias("shaw", _r(H, 5, D, seed=seed), max_distance=2)
    if kind == "t5":
        return RelativeBias("t5", _r(H, 6, seed=seed), num_buckets=6, max_distance=5)
    return RelativeBias("alibi", _r(H, seed=seed).abs().detach().requires_grad_())


@pytest.mark.parametrize("kind", ["shaw", "shaw_per_head", "t5", "alibi"])
def test_relative_bias_matches_reference(kind):
    """Values, gradients (the table's too) and the jvp (with a table tangent) of each bias kind."""
    q, k, v = _qkv()
    rel = _bias(kind)
    tab = rel.table
    run = lambda fn: lambda a, b, c, t: fn(a, b, c, causal=True, relative_bias=RelativeBias(  # noqa: E731
        rel.kind, t, max_distance=rel.max_distance, num_buckets=rel.num_buckets))
    tri = run(lambda *a, **kw: triton_attention(*a, **TILE, **kw))
    ref = run(reference)
    out, want = tri(q, k, v, tab), ref(q, k, v, tab)
    _close(out, want)
    for a, b in zip(_grads(out, (q, k, v, tab)), _grads(want, (q, k, v, tab))):
        _close(a, b)
    ts = tuple(torch.randn_like(x) for x in (q, k, v, tab))
    _close(jvp(tri, (q, k, v, tab), ts)[1], jvp(ref, (q, k, v, tab), ts)[1])


@pytest.mark.parametrize("name", ["causal", "padding", "window_symmetric", "block"])
def test_jvp_matches_reference(name):
    """torch.func.jvp through the Function's jvp rule (the fused kernel) for tangents of q, k, v."""
    kw = VARIANTS[name]
    xs = _qkv()
    ts = tuple(torch.randn_like(x) for x in xs)
    p, t = jvp(lambda a, b, c: triton_attention(a, b, c, **TILE, **kw), xs, ts)
    p_ref, t_ref = jvp(lambda a, b, c: reference(a, b, c, **kw), xs, ts)
    _close(p, p_ref)
    _close(t, t_ref)


def test_fused_jvp_one_pass_matches_reference():
    """attention_jvp: primal and tangent from one kernel pass; None tangents count as zero."""
    q, k, v = _qkv()
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    rel = _bias("shaw")
    for tangents in ((tq, tk, tv), (None, tk, None), (tq, None, None)):
        full = tuple(torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents))
        kw = dict(causal=True, key_padding_mask=_KPM, relative_bias=rel)
        out, t_out = attention_jvp(q, k, v, *tangents, **TILE, **kw)
        p_ref, t_ref = jvp(lambda a, b, c: reference(a, b, c, **kw), (q, k, v), full)
        _close(out, p_ref)
        _close(t_out, t_ref)


def test_vmap_grad_matches_reference():
    """Per-example gradients: vmap folds the vmapped dim into the kernels' batch (a per-example
    key padding mask and a per-example ALiBi slope table included)."""
    q, k, v = (x.detach()[None].repeat(3, 1, 1, 1, 1) + 0.1 * torch.randn(3, *x.shape, dtype=F64) for x in _qkv())
    kpm = torch.stack([_KPM, _KPM.roll(2, -1), torch.ones_like(_KPM)])
    slopes = torch.rand(3, H, dtype=F64)

    def loss(fn):
        def f(a, b, c, m, s):
            return (fn(a, b, c, causal=True, key_padding_mask=m, relative_bias=RelativeBias("alibi", s)) ** 2).sum()
        return vmap(grad(f, argnums=(0, 1, 2, 4)))

    got = loss(lambda *a, **kw: triton_attention(*a, **TILE, **kw))(q, k, v, kpm, slopes)
    want = loss(reference)(q, k, v, kpm, slopes)
    for a, b in zip(got, want):
        _close(a, b)


def test_vmap_of_jvp_matches_reference():
    q, k, v = _qkv()
    tq = torch.randn(3, *q.shape, dtype=F64)
    f = lambda fn: vmap(lambda t: jvp(lambda a: fn(a, k, v, causal=True), (q,), (t,))[1])  # noqa: E731
    _close(f(lambda *a, **kw: triton_attention(*a, **TILE, **kw))(tq), f(reference)(tq))


def test_hvp_matches_reference():
    """jvp(grad) and grad(grad): the backward, when differentiated, runs the exact dense twin."""
    q, k, v = _qkv()
    tri = lambda a: (triton_attention(a, k, v, causal=True, **TILE) ** 2).sum()  # noqa: E731
    ref = lambda a: (reference(a, k, v, causal=True) ** 2).sum()  # noqa: E731
    t = torch.randn_like(q)
    _close(jvp(grad(tri), (q,), (t,))[1], jvp(grad(ref), (q,), (t,))[1])
    g1 = torch.autograd.grad(torch.autograd.grad(tri(q), q, create_graph=True)[0].sum(), q)[0]
    g2 = torch.autograd.grad(torch.autograd.grad(ref(q), q, create_graph=True)[0].sum(), q)[0]
    _close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_reference(dtype):
    """fp32 and bf16 inputs (float32 accumulators) against the float64 reference."""
    q, k, v = _qkv()
    out = triton_attention(*(x.detach().to(dtype) for x in (q, k, v)), causal=True, **TILE)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.double() - reference(q, k, v, causal=True)).abs().max().item() < tol


def test_attention_routes_to_triton_and_auto_never_on_cpu(monkeypatch):
    """backend='triton' runs the kernels; 'auto' on the CPU never does; on CUDA it replaces
    blockwise only once TRITON_AUTO is set (read from the route table: this machine has no GPU)."""
    from aam_func.ops.attention import triton as pkg

    calls = []
    real = pkg.triton_attention
    monkeypatch.setattr(pkg, "triton_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv()
    _close(attention(q, k, v, backend="triton", window=3, causal=True), reference(q, k, v, window=3, causal=True))
    assert calls
    attention(q, k, v, backend="auto", window=3, causal=True)
    assert len(calls) == 1
    facts = backends.call_facts(q, k, v, backend="auto", causal=True, key_padding_mask=None, window=3, sparsity=None,
                                relative_bias=None, dropout_p=0.0, q_offset=None)
    assert not facts.triton and backends.choose_path(facts).path == "blockwise"
    cuda = dict(facts.__dict__, device="cuda", triton=True)
    # auto keeps blockwise on CUDA until a GPU run has checked the kernels (TRITON_AUTO)
    assert backends.choose_path(backends.CallFacts(**cuda)).path == "blockwise"
    monkeypatch.setattr(backends, "TRITON_AUTO", True)
    assert backends.choose_path(backends.CallFacts(**cuda)).path == "triton"
    assert backends.choose_path(backends.CallFacts(**dict(cuda, window=False, causal=False))).path == "sdpa"
    assert backends.choose_path(backends.CallFacts(**dict(cuda, backend="triton", q_offset=True))).path == "triton"


def test_dropout_on_triton_falls_back_to_math_with_a_warning():
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="backend='triton' has no attention dropout"):
        out = attention(q, k, v, backend="triton", dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    want = reference(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    _close(out, want)


def test_bad_input_errors(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_q a power of two"):
        triton_attention(q, k, v, block_q=6)
    with pytest.raises(TypeError, match="supports q dtypes"):
        triton_attention(*(x.detach().to(torch.int32) for x in (q, k, v)))
    from aam_func.ops.attention import triton as pkg

    monkeypatch.setattr(pkg, "available", lambda: False)
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        triton_attention(q, k, v)


@pytest.mark.slow
def test_compiles_without_graph_break():
    """Under torch.compile the jvp-free Function runs: one graph (fullgraph=True), same values
    and gradients."""
    import torch._dynamo

    q, k, v = _qkv()
    f = lambda a, b, c: triton_attention(a, b, c, causal=True, **TILE)  # noqa: E731
    torch._dynamo.reset()
    g = torch.compile(grad(lambda a, b, c: f(a, b, c).square().sum(), argnums=(0, 1, 2)), backend="aot_eager",
                      fullgraph=True)(q, k, v)
    want = grad(lambda a, b, c: reference(a, b, c, causal=True).square().sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, want):
        _close(a, b)


def test_sparse_tile_table_skips_exactly_the_empty_tiles():
    """The host-built (query tile, key tile) table: a pair is visited iff some position pair in
    it is allowed (block layout plus the always-allowed diagonal, and the causal band)."""
    from aam_func.ops.attention.masks import allowed_mask
    from aam_func.ops.attention.triton.function import _tile_table

    layout = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]).bool()
    sp = Sparsity("block", block_size=4, layout=layout)
    for causal, off, tq in ((False, 0, 16), (True, 0, 16), (True, 6, 10)):
        table = _tile_table(tq, 16, off, 4, 4, causal, None, sp, "cpu")
        full = allowed_mask(torch.arange(off, off + tq), torch.arange(16), causal=causal, sparsity=sp)
        full = torch.nn.functional.pad(full, (0, 0, 0, -(-tq // 4) * 4 - tq))
        want = full.reshape(-1, 4, 4, 4).any(3).any(1)
        assert torch.equal(table.bool(), want)
        assert not table.bool().all()  # something is skipped


_POINTER_ACC = {"LSE", "TLSE", "DL", "DQE", "DRB", "QE", "RB", "TQE", "TRB"}
_POINTER_IN = {"Q", "K", "V", "O", "TO", "TQ", "TK", "TV", "DO", "DK", "DV", "DQ"}


@pytest.mark.slow
@pytest.mark.parametrize("features", [True, False], ids=["every-variant", "plain"])
def test_kernels_compile_for_a_gpu_without_one(features):
    """Ahead-of-time compilation of the four kernels for sm_90 (bf16, 64 x 64 tiles) with
    triton's bundled ptxas: what the interpreter cannot check (types, layouts, shared memory)
    is checked by the real compiler, with every constexpr branch on, then off."""
    import inspect

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from aam_func.ops.attention.triton import launch

    mod = launch.load_kernels(False)
    consts = dict(CAUSAL=features, HAS_WINDOW=features, HAS_KPM=features, SPARSE=3 if features else 0,
                  HAS_QE=features, HAS_RB=features, ACC=tl.float32, PREC="tf32", UPCAST=False, BM=64, BN=64, BD=64,
                  BDV=64, HAS_TQ=True, HAS_TK=features, HAS_TV=features, HAS_TQE=features, HAS_TRB=features)
    for name in ("_fwd_kernel", "_jvp_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"):
        fn = getattr(mod, name)
        params = list(inspect.signature(fn.fn).parameters)
        sig = {}
        for p in params:
            if p in consts:
                sig[p] = "constexpr"
            elif p == "SCALE":
                sig[p] = "fp32"
            elif p in ("KPM", "LAYOUT", "TILES"):
                sig[p] = "*u8"
            elif p in _POINTER_ACC:
                sig[p] = "*fp32"
            elif p in _POINTER_IN and not (p == "DV" and name == "_fwd_kernel") and not (p == "DV" and name == "_jvp_kernel"):
                sig[p] = "*bf16"
            else:
                sig[p] = "i32"
        src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                        constexprs={(params.index(c),): v for c, v in consts.items() if c in params})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert compiled.metadata.shared <= 228 * 1024, (name, compiled.metadata.shared)


def test_model_with_the_triton_backend_equals_math():
    """A Transformer configured with attention_backend="triton" (GQA, padding): the loss and its
    gradient equal the math backend's."""
    import aam_func as af
    from aam_func import tree

    cfg = af.ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8, dropout=0.0,
                         attention_backend="triton")
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    tri, ref = af.Transformer(cfg), af.Transformer(cfg.replace(attention_backend="math"))
    params = tri.init(seed=0)
    loss = lambda m: lambda p: m.apply(p, input_ids=ids, attention_mask=mask, labels=ids)["loss"]  # noqa: E731
    assert abs(loss(tri)(params).item() - loss(ref)(params).item()) < 1e-5
    pairs = zip(tree.leaves(grad(loss(tri))(params)), tree.leaves(grad(loss(ref))(params)))
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-5
