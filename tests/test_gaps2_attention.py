"""Attention behaviour that the full mutation campaign found unchecked (issue 17): defaults,
shapes and boundary cases of ``ops.attention``, each checked against a formula or convention
written out here rather than against the library's own reference."""

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
