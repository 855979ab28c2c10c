"""The dense attention paths: each builds the whole (q_len, k_len) score matrix, or lets a
library kernel do it.

- :func:`reference`: the composite math, autograd-differentiated; every other path must equal
  it, and it is the blockwise kernel's registered twin. The only path with dropout.
- :func:`dense_bias`: the same math with the mask as an additive 0/−inf bias and the scale
  folded into one ``baddbmm`` (no key padding, no relative bias).
- :func:`sdpa`: ``F.scaled_dot_product_attention``, its fused kernels when no mask is needed,
  else a dense bool mask.
- :func:`xformers`: ``xformers.ops.memory_efficient_attention``, standard attention only.

Which one runs is :func:`aam_func.ops.attention.backends.choose_path`'s decision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import RelativeBias, Sparsity, dense_mask, query_positions, relative_logits
from .._util import values_inspectable
from .mods import index_grid

__all__ = ["reference", "dense_bias", "sdpa", "xformers", "expand_kv", "softmax_scale"]


def softmax_scale(head_dim: int, scale: Optional[float] = None):
    """The factor on q·kᵀ: ``scale`` if given, else 1/sqrt(head_dim) (Vaswani et al. 2017;
    what SDPA and xformers use when passed ``scale=None``)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def expand_kv(k: Tensor, heads: int) -> Tensor:
    """(B, kv_heads, T, d) -> (B, heads, T, d): kv head g serves query heads g·R .. g·R + R − 1."""
    rep = heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
    relative_bias: Optional[RelativeBias] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    q_offset=None,
    score_mod=None,
    mask_mod=None,
) -> Tensor:
    """Dense composite attention: the math every other backend must equal.

    softmax(score_mod(scale · q kᵀ + relative term), −∞ where not allowed) v, with dropout on
    the probabilities (kept ones scaled by 1 / (1 − p)). With a mod, a row that allows no key
    gives 0 (FlexAttention's convention; the fixed menu never empties a row).
    """
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    scale = softmax_scale(q.shape[-1], scale)
    k, v = expand_kv(k, H), expand_kv(v, H)
    q_pos = query_positions(Tq, Tk, q_offset, q.device)
    k_pos = torch.arange(Tk, device=q.device)
    logits = torch.matmul(q, k.transpose(-1, -2))  # (B, H, Tq, Tk)
    if relative_bias is not None:
        term, before = relative_logits(q, q_pos, k_pos, relative_bias)
        if before:
            logits = (logits + term) * scale
        else:
            logits = logits * scale + term.to(logits.dtype)
    else:
        logits = logits * scale
    ok = dense_mask(q_pos, k_pos, key_padding_mask, causal=causal, window=window, sparsity=sparsity)
    if score_mod is not None or mask_mod is not None:
        return _modded(q, v, logits, ok, score_mod, mask_mod, dropout_p, generator)
    logits = logits.masked_fill(~ok, float("-inf"))
    return torch.matmul(_dropout(torch.softmax(logits, dim=-1), dropout_p, generator), v)


def _modded(q, v, logits, ok, score_mod, mask_mod, dropout_p, generator) -> Tensor:
    """The rest of :func:`reference` with mods: score_mod on the whole (B, H, Tq, Tk) logits,
    mask_mod joined to the mask, empty rows 0."""
    B, H, Tq, Tk = logits.shape
    idx = index_grid(B, H, Tq, Tk, q.device)
    if score_mod is not None:
        logits = score_mod(logits, *idx).expand(logits.shape)
    if mask_mod is not None:
        ok = ok & mask_mod(*idx)
    logits = logits.masked_fill(~ok, float("-inf"))
    if score_mod is None and _no_empty_row(ok):  # e.g. causal ∧ same document: the diagonal is allowed
        probs = torch.softmax(logits, dim=-1)  # no row to zero: the general path's two fills are identities
        return torch.matmul(_dropout(probs, dropout_p, generator), v)
    empty = (logits == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(_dropout(probs, dropout_p, generator), v)


def _no_empty_row(ok: Tensor) -> bool:
    """Whether every row of the bool mask ``ok`` (…, Tq, Tk) allows some key, read from the mask
    itself (B·Tq·Tk bools, not the B·H·Tq·Tk logits). False where values cannot be read
    (under vmap or while compiling): the caller then takes the general path."""
    return values_inspectable() and bool(ok.any(-1).all())


def _dropout(probs: Tensor, dropout_p: float, generator) -> Tensor:
    """Attention dropout on the probabilities: kept ones scaled by 1 / (1 − p)."""
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return probs


def dense_bias(q, k, v, *, causal, window, sparsity, scale):
    """The dense math path with the mask as an additive 0/−inf bias and the scale folded into one
    ``baddbmm`` (no key padding, no relative bias): scores = bias + scale · q kᵀ in one kernel,
    instead of a matmul, a scale pass and a masked_fill pass over the (B, H, Tq, Tk) scores
    forward and backward. ``auto`` uses it under CPU bf16 autocast with a gradient, where the
    dense path beats SDPA's CPU backward. Equal to :func:`reference` (the same masked softmax:
    exp(−inf) = 0 and its gradient is 0 there)."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    scale = softmax_scale(d, scale)
    k, v = expand_kv(k, H), expand_kv(v, H)
    q_pos = query_positions(Tq, Tk, None, q.device)
    ok = dense_mask(q_pos, torch.arange(Tk, device=q.device), None, causal=causal, window=window, sparsity=sparsity)
    bias = torch.zeros((Tq, Tk), dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
    logits = torch.baddbmm(bias, q.reshape(B * H, Tq, d), k.reshape(B * H, Tk, d).transpose(1, 2), alpha=scale)
    probs = torch.softmax(logits, dim=-1)
    return torch.bmm(probs, v.reshape(B * H, Tk, -1)).reshape(B, H, Tq, -1)


def sdpa(q, k, v, *, causal, key_padding_mask, window, sparsity, scale, q_offset=None, mask_mod=None):
    """``F.scaled_dot_product_attention``: its own causal flag when the mask is the plain
    bottom-right triangle of a square (or needs no mask at all), else a dense bool mask; with a
    ``mask_mod``, the dense mask joined to it (:func:`_sdpa_mask_mod`)."""
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    gqa = H != k.shape[1]
    if mask_mod is not None:
        return _sdpa_mask_mod(q, k, v, causal=causal, key_padding_mask=key_padding_mask, window=window,
                              sparsity=sparsity, scale=scale, mask_mod=mask_mod)
    plain = key_padding_mask is None and window is None and sparsity is None and q_offset is None
    if plain and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if plain and (not causal or Tq == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    q_pos = query_positions(Tq, Tk, q_offset, q.device)
    k_pos = torch.arange(Tk, device=q.device)
    ok = dense_mask(q_pos, k_pos, key_padding_mask, causal=causal, window=window, sparsity=sparsity)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, scale=scale, enable_gqa=gqa)


def _sdpa_mask_mod(q, k, v, *, causal, key_padding_mask, window, sparsity, scale, mask_mod):
    """SDPA with the whole (B, H | 1, Tq, Tk) bool mask of the menu and a ``mask_mod``: the mod's
    semantics (:func:`reference`'s) through SDPA's fused CPU kernel. A row that allows no key
    gives 0 and gradient 0 (FlexAttention's convention): such rows attend to every key inside
    SDPA (no NaN) and their output is zeroed, which also zeroes their gradient. Only for short
    sequences (``backends.DENSE_MODS_MAX_LEN``): it reads every tile, the blockwise kernel skips."""
    B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    q_pos = query_positions(Tq, Tk, None, q.device)
    ok = dense_mask(q_pos, torch.arange(Tk, device=q.device), key_padding_mask, causal=causal, window=window,
                    sparsity=sparsity)
    ok = ok & mask_mod(*index_grid(B, H, Tq, Tk, q.device))
    empty = ~ok.any(-1, keepdim=True)  # (…, Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ok | empty, scale=scale, enable_gqa=H != k.shape[1])
    return out.masked_fill(empty, 0.0)


def xformers(q, k, v, *, causal, key_padding_mask, window, sparsity, scale):
    """``xformers.ops.memory_efficient_attention`` for full or causal attention."""
    try:
        import xformers.ops as xops  # type: ignore
    except ImportError as e:
        raise ImportError(
            "backend='xformers' needs the 'xformers' package (pip install xformers); "
            "use backend='blockwise' for memory-efficient attention without it"
        ) from e
    Tq, Tk = q.shape[2], k.shape[2]
    if key_padding_mask is not None or window is not None or sparsity is not None:
        raise ValueError("backend='xformers' supports standard (causal or full) attention only; use 'blockwise'")
    bias = None
    if causal:
        bias = xops.LowerTriangularMask() if Tq == Tk else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - xformers wants (batch, seq, heads, head_dim)
    return t(xops.memory_efficient_attention(t(q), t(k), t(v), attn_bias=bias, scale=scale))
