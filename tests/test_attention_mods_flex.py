"""The blockwise kernel with mods equals torch's FlexAttention forward on the CPU (issue 20).

torch 2.13's ``flex_attention`` runs eagerly on the CPU (an unfused implementation, with a
warning) for the forward only: "FlexAttention does not support backward on CPU". So the
gradients are checked against the dense math (tests/test_attention_mods.py) and, on CUDA,
against FlexAttention's backward (``test_flex_backward_on_cuda``, marked ``cuda``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

from aam_func.ops.attention import attention, create_block_mask, mods

from test_attention_mods import build, cases

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


def _flex(q, k, v, score_mod, mask_mod):
    bm = None
    if mask_mod is not None:
        bm = flex_attention.create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device.type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": the point here
        return flex_attention.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                             enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.slow  # 27 s under load for 8 cases: eager FlexAttention on the CPU is slow to start
@settings(deadline=None, max_examples=8)
@given(cases())
def test_blockwise_equals_flex_forward_for_random_mods(c):
    c = {**c, "causal": False}  # the menu's causal flag is ours; FlexAttention sees the mods only
    inputs, f = build(c)
    out = f("blockwise", *inputs)
    ref = _flex(*inputs[:3], *f.mods_of(*inputs[3:]))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_document_mask_equals_flex_with_gqa_and_softcap():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 24, 8, generator=g, dtype=torch.float64) for _ in range(2))
    doc = torch.sort(torch.randint(0, 4, (2, 24), generator=g), dim=-1).values
    mask = mods.and_masks(mods.causal_mask, mods.document(doc))
    sm = mods.softcap(3.0)
    bm = create_block_mask(mask, 2, 1, 24, 24, BLOCK_SIZE=8)
    out = attention(q, k, v, score_mod=sm, block_mask=bm, backend="blockwise")
    torch.testing.assert_close(out, _flex(q, k, v, sm, mask), atol=1e-10, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_backward_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32, requires_grad=True)  # noqa: E731
    q, k, v, tab = r(2, 4, 256, 64), r(2, 4, 256, 64), r(2, 4, 256, 64), r(4, 17)
    doc = torch.arange(256, device="cuda").div(64, rounding_mode="floor").expand(2, 256)
    mask = mods.and_masks(mods.causal_mask, mods.document(doc))
    sm = mods.relative_table(tab, 8)
    a = attention(q, k, v, score_mod=sm, mask_mod=mask, backend="blockwise")
    compiled = torch.compile(flex_attention.flex_attention)
    bm = flex_attention.create_block_mask(mask, 2, 1, 256, 256, device="cuda")
    b = compiled(q, k, v, score_mod=sm, block_mask=bm)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    ga = torch.autograd.grad(a.square().sum(), (q, k, v, tab))
    gb = torch.autograd.grad(b.square().sum(), (q, k, v, tab))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_the_flex_path_folds_causal_and_caches_its_block_mask(monkeypatch):
    """aam_func's FlexAttention path (taken by ``auto`` on CUDA), run here with FlexAttention's
    eager CPU forward in place of the compiled kernel: the menu's causal flag is folded into the
    mask_mod, GQA goes through enable_gqa, and FlexAttention's block mask is built once per
    BlockMask."""
    from aam_func.ops.attention import flex as flex_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setitem(flex_path._COMPILED, "fn", flex_attention.flex_attention)
        g = torch.Generator().manual_seed(5)
        q = torch.randn(1, 4, 16, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(2))
        doc = torch.tensor([[0] * 7 + [1] * 9])
        bm = create_block_mask(mods.document(doc), 1, 1, 16, 16, BLOCK_SIZE=8)
        sm = mods.softcap(2.0)
        a = flex_path.flex(q, k, v, causal=True, score_mod=sm, mask_mod=None, block_mask=bm, scale=None)
        assert len(bm.cache) == 1
        flex_path.flex(q, k, v, causal=True, score_mod=sm, mask_mod=None, block_mask=bm, scale=None)
        assert len(bm.cache) == 1  # reused, not rebuilt
        b = attention(q, k, v, causal=True, score_mod=sm, block_mask=bm, backend="blockwise")
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
