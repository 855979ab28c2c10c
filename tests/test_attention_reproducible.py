"""Document masking and the mods are bitwise reproducible on the CPU, and the dense routes a
short mask-only call takes equal the math (issue 20).

A training step with document masking once differed run to run with 2 threads: per-document
positions repeat, and the learnable position table's gradient came from indexing, whose backward
(``index_put_`` with accumulate) adds repeated rows in thread order on the CPU (torch's
reproducibility notes list it). A repeat test catches that only when the threads happen to race,
so the first tests here look for the op itself: they record every aten op a forward and backward
runs and refuse the ones whose result depends on thread timing on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aam_func as af
from aam_func.ops.attention import RelativeBias, attention, backends, mods, reference
from aam_func.ops.attention.masks import table_lookup

EOS = 0


class _ThreadOrderOps(TorchDispatchMode):
    """Records the CPU ops whose result depends on thread timing: ``index_put`` / ``put_`` with
    accumulate (indexing's backward). (torch's list also names ops that are CUDA-only.)"""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "put", "put_"):
            acc = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if acc:
                self.found.append(name)
        return func(*args, **kwargs)


def _ops_of_step(fn, params):
    """The thread-order ops a forward and backward of ``fn(params)`` runs (plain autograd)."""
    params = torch.utils._pytree.tree_map(lambda t: t.detach().requires_grad_(), params)
    rec = _ThreadOrderOps()
    with rec:
        fn(params).backward()
    return rec.found


def _model(**kw):
    cfg = dict(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, dropout=0.0, document_mask=True,
               eos_token_id=EOS, position_encoding="learnable")
    cfg.update(kw)
    m = af.Transformer(af.ModelConfig(**cfg))
    return m, m.init(seed=0)


def _ids(B=2, T=32):
    return torch.randint(0, 6, (B, T), generator=torch.Generator().manual_seed(0))  # many documents


def test_the_recorder_finds_indexing_backward():
    """The check can fail: a learnable table read by indexing at repeated positions."""
    w = torch.randn(8, 4)
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    assert _ops_of_step(lambda p: p["w"][pos].sum(), {"w": w}) != []
    assert _ops_of_step(lambda p: table_lookup(p["w"], pos).sum(), {"w": w}) == []


@pytest.mark.parametrize("backend", ["auto", "math", "blockwise"])
@pytest.mark.parametrize("pe", ["learnable", "rope", "sinusoidal"])
def test_a_document_masked_step_runs_no_thread_order_op(backend, pe):
    m, p = _model(attention_backend=backend, position_encoding=pe)
    ids = _ids()
    assert _ops_of_step(lambda q: m.apply(q, ids, labels=ids)["loss"], p) == []


@pytest.mark.parametrize("backend", ["math", "blockwise"])
def test_the_predefined_score_mods_run_no_thread_order_op(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    table = torch.randn(2, 5, generator=g)
    for make in (lambda t: mods.relative_table(t, 2), lambda t: mods.t5(t, num_buckets=5, max_distance=8),
                 lambda t: mods.alibi(t[:, 0])):
        f = lambda p, make=make: attention(p["q"], k, v, causal=True, score_mod=make(p["t"]), backend=backend).sum()  # noqa: E731
        assert _ops_of_step(f, {"q": q, "t": table}) == []
    t5 = lambda p: reference(p["q"], k, v, relative_bias=RelativeBias("t5", p["t"], num_buckets=5)).sum()  # noqa: E731
    assert _ops_of_step(t5, {"q": q, "t": table}) == []


def test_table_lookup_equals_indexing():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 7, 2, generator=g, dtype=torch.float64)
    h = torch.arange(3).view(3, 1, 1)
    j = torch.randint(0, 7, (4, 5), generator=g)
    assert torch.equal(table_lookup(t, h, j), t[h, j])
    assert torch.equal(table_lookup(t[:, :, 0], h, j), t[:, :, 0][h, j])
    gl = torch.func.grad(lambda x: (table_lookup(x, h, j) ** 2).sum())(t)
    gi = torch.func.grad(lambda x: (x[h, j] ** 2).sum())(t)
    torch.testing.assert_close(gl, gi, atol=1e-12, rtol=0)


def test_a_document_masked_step_repeats_bitwise_with_two_threads():
    """The same gradient, bit for bit, three times in one process with 2 threads (the failure
    this guards against shows only when the threads race; the op tests above are the firm check)."""
    m, p = _model(d_model=32, n_heads=2, max_seq_len=128)
    ids = _ids(8, 128)
    f = lambda q: m.apply(q, ids, labels=ids, return_logits=False)["loss"]  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [torch.func.grad(f)(p) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(runs[0]), torch.utils._pytree.tree_leaves(r)):
            assert torch.equal(a, b)


# ------------------------------------------------------------ the dense routes of a mask_mod


def _facts(**changes):
    base = dict(backend="auto", device="cpu", same_dtype=True, cpu_bf16_grad=False, compiling=False, forward_ad=False,
                vmap=False, q_offset=False, relative_bias=False, dropout=False, padding=False, window=False,
                sparsity=False, causal=True, q_len=128, k_len=128, mods=True, mask_only=True)
    return backends.choose_path(backends.CallFacts(**{**base, **changes})).path


def test_a_short_mask_only_call_on_the_cpu_takes_a_dense_path():
    assert _facts() == "sdpa"
    assert _facts(padding=True, window=True, k_len=backends.DENSE_MODS_MAX_LEN) == "sdpa"
    assert _facts(cpu_bf16_grad=True) == "math"  # as without mods: SDPA's CPU bf16 backward is slow
    for why in (dict(mask_only=False), dict(k_len=backends.DENSE_MODS_MAX_LEN + 1), dict(forward_ad=True),
                dict(vmap=True), dict(compiling=True), dict(relative_bias=True), dict(same_dtype=False),
                dict(backend="blockwise")):
        assert _facts(**why) == "blockwise", why
    assert _facts(device="cuda", flex_available=False) == "blockwise"
    assert _facts(backend="math") == "math" and _facts(dropout=True) == "math"


def _qkv(B=2, H=4, Hkv=2, T=10, d=3):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, h, T, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))


@pytest.mark.parametrize("case", ["document", "empty_rows", "padding"])
def test_the_sdpa_mask_mod_path_equals_the_math(case, monkeypatch):
    from aam_func.ops import attention as pkg

    q, k, v = _qkv()
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    kw = dict(causal=True, mask_mod=mods.document(docs))
    if case == "empty_rows":  # rows 0 and 1 of head 1 read nothing: output 0, gradient 0
        kw = dict(causal=False, mask_mod=lambda b, h, i, j: ~((h == 1) & (i < 2)))
    if case == "padding":
        kw["key_padding_mask"] = torch.tensor([[True] * 8 + [False] * 2, [False] + [True] * 9])
    seen = []
    sdpa = pkg._sdpa
    monkeypatch.setattr(pkg, "_sdpa", lambda *a, **k: seen.append(1) or sdpa(*a, **k))

    def run(backend):
        return torch.func.grad_and_value(lambda q, k, v: (attention(q, k, v, backend=backend, **kw) ** 2).sum(),
                                         argnums=(0, 1, 2))(q, k, v)

    (ga, la), (gm, lm) = run("auto"), run("math")
    assert seen, "auto took the SDPA path"
    torch.testing.assert_close(la, lm, atol=1e-12, rtol=0)
    for a, b in zip(ga, gm):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    if case == "empty_rows":
        out = attention(q, k, v, **kw)
        assert torch.equal(out[:, 1, :2], torch.zeros_like(out[:, 1, :2]))
        assert torch.equal(ga[0][:, 1, :2], torch.zeros_like(ga[0][:, 1, :2]))


def test_the_math_path_with_a_mask_that_empties_no_row_is_the_plain_math_bit_for_bit():
    """Its shortcut (no zeroing of empty rows when the mask has none) changes no bit: a
    mask_mod that allows every pair gives the plain causal math's output and gradients."""
    q, k, v = (t.float() for t in _qkv())
    everything = lambda b, h, i, j: j >= 0  # noqa: E731
    f = lambda **kw: torch.func.grad_and_value(  # noqa: E731
        lambda q: (reference(q, k, v, causal=True, **kw) ** 2).sum())(q)
    (g0, l0), (g1, l1) = f(), f(mask_mod=everything)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    # and under vmap (values unreadable) the general path gives the same values
    per = torch.func.vmap(lambda q1: reference(q1[None], k[:1], v[:1], causal=True, mask_mod=everything)[0])(q)
    torch.testing.assert_close(per, reference(q, k[:1].expand_as(k), v[:1].expand_as(v), causal=True))
