"""Attention behaviour that mutation testing found unchecked: the default (non-causal) call,
bottom-right causal alignment on the SDPA path when 1 < Tq < Tk, ``q_offset``, and dropout
that actually drops. Each backend is compared with softmax(q kᵀ / √d, masked) v written out
here, not with the library's own reference."""

import math

import pytest
import torch

from aam_func.ops.attention import attention


def _qkv(B=1, H=2, Tq=3, Tk=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, H, Tq, d), r(B, H, Tk, d), r(B, H, Tk, d)


def _formula(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa", "blockwise"])
def test_default_call_is_non_causal_attention(backend):
    q, k, v = _qkv(Tq=5, Tk=5)
    out = attention(q, k, v, backend=backend, block_q=2, block_k=2)
    want = _formula(q, k, v, torch.ones(5, 5, dtype=torch.bool))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    causal = attention(q, k, v, causal=True, backend=backend, block_q=2, block_k=2)
    assert (causal - out).abs().max() > 1e-3  # the default really is the full, non-causal one


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "blockwise"])
def test_causal_aligns_queries_to_the_last_keys_when_tq_lt_tk(backend):
    Tq, Tk = 3, 7
    q, k, v = _qkv(Tq=Tq, Tk=Tk)
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None]
    want = _formula(q, k, v, j <= Tk - Tq + i)  # query i sits at position Tk - Tq + i
    out = attention(q, k, v, causal=True, backend=backend, block_q=2, block_k=3)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("offset", [0, 2, torch.tensor(4)])
def test_q_offset_places_queries(backend, offset):
    Tq, Tk = 2, 7
    q, k, v = _qkv(Tq=Tq, Tk=Tk, seed=1)
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None]
    want = _formula(q, k, v, j <= int(offset) + i)
    out = attention(q, k, v, causal=True, backend=backend, q_offset=offset)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_attention_dropout_drops_and_rescales():
    T, p = 16, 0.5
    q, k, _ = _qkv(B=1, H=1, Tq=T, Tk=T, d=T, seed=2)
    v = torch.eye(T, dtype=torch.float64)[None, None]  # out = the (dropped) probabilities
    probs = attention(q, k, v, backend="math")
    out = attention(q, k, v, backend="math", dropout_p=p, generator=torch.Generator().manual_seed(0))
    dropped = out == 0
    assert 0.35 < dropped.float().mean().item() < 0.65  # about p of them, not none, not all
    kept = ~dropped
    torch.testing.assert_close(out[kept], probs[kept] / (1 - p), rtol=1e-12, atol=1e-12)
    again = attention(q, k, v, backend="math", dropout_p=p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
