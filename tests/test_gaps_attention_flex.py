"""Gaps found by mutation testing (scripts/mutation.py) on the FlexAttention path.

The library takes that path only on CUDA (``_route_mods``), so these tests call the path's
function directly on the CPU with torch's eager FlexAttention forward in place of the compiled
kernel (a recorder that passes its arguments on), at shapes small enough to run in a few
seconds. What they pin: GQA reaches FlexAttention whatever the sequence lengths (a mutant that
compared a sequence length with a head count broke one-token decoding under multi-query
attention), and the block mask built for a call without an aam_func ``BlockMask`` has
FlexAttention's default block size, the tile its fused kernel is built for (a mutant changed
the default from 128 to 129, which the CUDA kernel refuses: its block sizes must divide the
block mask's), over the call's own batch and heads (a mutant took the batch from the head
count)."""

from __future__ import annotations

import warnings

import pytest
import torch

from aam_func.ops.attention import attention, create_block_mask, mods

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def eager_flex(monkeypatch):
    """The flex path with FlexAttention's eager CPU forward as its kernel; returns the calls seen."""
    from aam_func.ops.attention import flex as flex_path

    calls = []

    def recorder(q, k, v, **kw):
        calls.append(kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            return flex_attention.flex_attention(q, k, v, **kw)

    monkeypatch.setitem(flex_path._COMPILED, "fn", recorder)
    return flex_path.flex, calls


def _qkv(hq, hkv, tq, tk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, tq, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, hkv, tk, 4, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("hq, hkv, tq, tk", [
    (4, 1, 1, 5),   # one-token decoding under multi-query attention: Tq == Hkv
    (4, 2, 2, 3),   # Tq == Hkv
    (4, 2, 3, 4),   # Tk == Hq
    (2, 2, 2, 3),   # no GQA, Tq == H
])
def test_flex_path_serves_gqa_at_any_sequence_length(eager_flex, hq, hkv, tq, tk):
    """Grouped-query attention on the flex path equals the math path, whatever the sequence
    lengths are next to the head counts."""
    flex, _ = eager_flex
    q, k, v = _qkv(hq, hkv, tq, tk, seed=hq + 7 * tq + 13 * tk)
    window = mods.sliding_window(2)
    out = flex(q, k, v, causal=False, score_mod=mods.softcap(2.0), mask_mod=window, block_mask=None, scale=None)
    ref = attention(q, k, v, score_mod=mods.softcap(2.0), mask_mod=window, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_flex_path_builds_its_block_mask_at_flex_default_block_size(eager_flex):
    """Without an aam_func BlockMask the path builds FlexAttention's block mask with
    FlexAttention's default block size (the tile its fused CUDA kernel needs); with one, it uses
    that BlockMask's block size. Both give the math path's result."""
    flex, calls = eager_flex
    q, k, v = _qkv(2, 2, 6, 6, seed=11)
    window = mods.sliding_window(3)
    out = flex(q, k, v, causal=True, score_mod=None, mask_mod=window, block_mask=None, scale=None)
    default = flex_attention._DEFAULT_SPARSE_BLOCK_SIZE
    assert tuple(calls[-1]["block_mask"].BLOCK_SIZE) == (default, default)
    torch.testing.assert_close(out, attention(q, k, v, causal=True, mask_mod=window, backend="math"),
                               atol=1e-12, rtol=1e-12)

    bm = create_block_mask(window, 1, 1, 6, 6, BLOCK_SIZE=2)
    out = flex(q, k, v, causal=True, score_mod=None, mask_mod=None, block_mask=bm, scale=None)
    assert tuple(calls[-1]["block_mask"].BLOCK_SIZE) == (2, 2)
    torch.testing.assert_close(out, attention(q, k, v, causal=True, block_mask=bm, backend="math"),
                               atol=1e-12, rtol=1e-12)


def test_flex_path_mask_reading_per_example_and_per_head_tables(eager_flex):
    """A mask_mod may index tables with b (one row per example) and h (one entry per head):
    without an aam_func BlockMask the path builds the block mask over the call's own batch and
    heads (B=2, H=3, T=5, all different), and the result equals the math path."""
    flex, calls = eager_flex
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    doc = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    width = torch.tensor([0, 1, 3])

    def mask(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & ((q_idx - kv_idx).abs() <= width[h])

    out = flex(q, k, v, causal=False, score_mod=None, mask_mod=mask, block_mask=None, scale=None)
    assert tuple(calls[-1]["block_mask"].shape[:2]) == (2, 3)
    torch.testing.assert_close(out, attention(q, k, v, mask_mod=mask, backend="math"), atol=1e-12, rtol=1e-12)
