"""Scaled dot-product attention with every variant the models use.

``attention(q, k, v, ...)`` takes q shaped (batch, heads, q_len, head_dim) and k, v shaped
(batch, kv_heads, k_len, head_dim) with ``heads % kv_heads == 0`` (grouped-query attention:
query head h reads kv head ``h // (heads // kv_heads)``).

Positions. Queries are the *last* ``q_len`` positions of the key sequence (bottom-right
alignment): query i sits at absolute position ``k_len - q_len + i``. With q_len == k_len this is
ordinary self-attention; with q_len < k_len it is decoding against a KV cache.

Which keys a query at position i may read (all conditions must hold):
- ``causal``: j <= i.
- ``key_padding_mask`` (batch, k_len) bool, True = a real token: key j is real, *or* j == i.
  The ``j == i`` exception keeps every row non-empty, so padded queries attend to themselves
  instead of producing NaN; real queries never see padded keys.
- ``window=w`` (local attention): the query reads the ``w`` most recent keys including itself,
  ``0 <= i - j < w``; without ``causal`` the band is symmetric, ``|i - j| < w``.
- ``sparsity`` (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"):
  ``Sparsity("strided", stride=l)``: ``|i - j| < l`` or ``(i - j) % l == 0``;
  ``Sparsity("fixed", stride=l, summary=c)``: same block ``i // l == j // l`` or j is one of the
  last c positions of its block, ``j % l >= l - c``;
  ``Sparsity("block", block_size=b, layout=L)``: a bool layout L (q_blocks, k_blocks) of blocks of
  b positions, ``L[i // b, j // b]``.
  The diagonal j == i is always allowed, so no row is empty.
- ``relative_bias`` adds a position-dependent term to the logits (see :class:`RelativeBias`).

Backends: ``"math"`` (the dense composite reference, autograd-differentiated),
``"sdpa"`` (``F.scaled_dot_product_attention``), ``"auto"`` (SDPA when the variant allows and
no forward-mode AD is active, else the math path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._util import forward_ad_active

__all__ = ["attention", "Sparsity", "RelativeBias", "allowed_mask", "relative_logits", "reference", "BACKENDS"]

BACKENDS = ("auto", "math", "sdpa")


@dataclass(frozen=True)
class Sparsity:
    """A fixed sparse pattern (Child et al. 2019): ``"strided"``, ``"fixed"`` or ``"block"``."""

    pattern: str
    stride: int = 0
    summary: int = 1
    block_size: int = 0
    layout: Optional[Tensor] = None  # (q_blocks, k_blocks) bool, for "block"

    def __post_init__(self):
        if self.pattern not in ("strided", "fixed", "block"):
            raise ValueError(f"sparsity pattern must be 'strided', 'fixed' or 'block', got {self.pattern!r}")
        if self.pattern in ("strided", "fixed") and (not isinstance(self.stride, int) or self.stride <= 0):
            raise ValueError(f"sparsity stride must be a positive int for {self.pattern!r}, got {self.stride!r}")
        if self.pattern == "fixed" and not (0 < self.summary <= self.stride):
            raise ValueError(f"sparsity summary must be in [1, stride={self.stride}], got {self.summary!r}")
        if self.pattern == "block":
            if not isinstance(self.block_size, int) or self.block_size <= 0:
                raise ValueError(f"block sparsity needs block_size > 0, got {self.block_size!r}")
            if not isinstance(self.layout, Tensor) or self.layout.dtype != torch.bool or self.layout.dim() != 2:
                raise ValueError("block sparsity needs layout, a 2-D bool tensor (q_blocks, k_blocks)")


@dataclass(frozen=True)
class RelativeBias:
    """A relative-position term added to the attention logits, chosen by ``kind``:

    - ``"shaw"`` (Shaw et al. 2018): ``table`` (2K+1, head_dim) or (heads, 2K+1, head_dim) of learned
      key embeddings; logit_ij += q_i · table[clip(j - i, -K, K) + K], K = ``max_distance``; the
      whole logit (content + position) is then multiplied by the scale.
    - ``"t5"`` (Raffel et al. 2020): ``table`` (heads, num_buckets); logit_ij += table[h, bucket(j - i)]
      with T5's log-spaced buckets (``bidirectional`` splits them by sign), added after scaling.
    - ``"alibi"`` (Press et al. 2022): ``table`` (heads,) of slopes; logit_ij += -slope_h * |i - j|,
      added after scaling.
    """

    kind: str
    table: Tensor
    max_distance: int = 128
    num_buckets: int = 32
    bidirectional: bool = True

    def __post_init__(self):
        if self.kind not in ("shaw", "t5", "alibi"):
            raise ValueError(f"relative_bias kind must be 'shaw', 't5' or 'alibi', got {self.kind!r}")
        if not isinstance(self.table, Tensor):
            raise TypeError(f"relative_bias table must be a Tensor, got {type(self.table).__name__}")
        if not isinstance(self.max_distance, int) or self.max_distance <= 0:
            raise ValueError(f"relative_bias max_distance must be a positive int, got {self.max_distance!r}")


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, window, scale):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, seq, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree in batch, heads and length; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q_len ({q.shape[2]}) must not exceed k_len ({k.shape[2]})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (batch, k_len), True for real tokens; got "
                + (str(key_padding_mask.dtype) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__)
            )
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, k_len) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int, got {window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def allowed_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None,
) -> Tensor:
    """(len(q_pos), len(k_pos)) bool: which keys each query may read, from positions alone.

    Used whole by the dense path and tile by tile by tiled kernels. Key padding is separate.
    """
    i = q_pos[:, None]
    j = k_pos[None, :]
    ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        d = i - j
        ok = ok & ((d < window) & (d >= 0) if causal else d.abs() < window)
    if sparsity is not None:
        if sparsity.pattern == "strided":
            d = i - j
            sp = (d.abs() < sparsity.stride) | (torch.remainder(d, sparsity.stride) == 0)
        elif sparsity.pattern == "fixed":
            l, c = sparsity.stride, sparsity.summary
            sp = (torch.div(i, l, rounding_mode="floor") == torch.div(j, l, rounding_mode="floor")) | (
                torch.remainder(j, l) >= l - c
            )
        else:
            b = sparsity.block_size
            layout = sparsity.layout.to(q_pos.device)
            qb = torch.div(i, b, rounding_mode="floor").clamp(max=layout.shape[0] - 1)
            kb = torch.div(j, b, rounding_mode="floor").clamp(max=layout.shape[1] - 1)
            sp = layout[qb, kb]
        ok = ok & (sp | (i == j))
    return ok


def t5_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's relative-position bucket of ``relative = j - i`` (Raffel et al. 2020, as in mesh-tensorflow)."""
    buckets = torch.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n = n // 2
        buckets = buckets + (relative > 0).to(relative.dtype) * n
        rel = relative.abs()
    else:
        rel = (-relative).clamp(min=0)
    max_exact = n // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).to(relative.dtype)
    large = large.clamp(max=n - 1)
    return buckets + torch.where(is_small, rel, large)


def relative_logits(q: Tensor, q_pos: Tensor, k_pos: Tensor, rel: RelativeBias) -> tuple[Tensor, bool]:
    """The relative term for queries ``q`` (..., heads, len(q_pos), d) against ``k_pos``.

    Returns (term, before_scale): ``before_scale`` says whether the term joins q·k before the
    softmax scale is applied (Shaw) or after (T5, ALiBi).
    """
    relative = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk): j - i
    if rel.kind == "shaw":
        K = rel.max_distance
        idx = relative.clamp(-K, K) + K  # (Tq, Tk)
        table = rel.table
        if table.dim() == 2:  # (2K+1, d): shared over heads
            qe = torch.matmul(q, table.transpose(-1, -2))  # (..., H, Tq, 2K+1)
        else:  # (H, 2K+1, d)
            qe = torch.matmul(q, table.transpose(-1, -2))
        index = idx.expand(qe.shape[:-2] + idx.shape)
        return torch.gather(qe, -1, index), True
    if rel.kind == "t5":
        bucket = t5_bucket(
            relative, bidirectional=rel.bidirectional, num_buckets=rel.num_buckets, max_distance=rel.max_distance
        )
        return rel.table[:, bucket], False  # (H, Tq, Tk)
    slopes = rel.table  # alibi
    return -slopes[:, None, None] * relative.abs().to(slopes.dtype)[None], False


def _expand_kv(k: Tensor, heads: int) -> Tensor:
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
) -> Tensor:
    """Dense composite attention: the math every other backend must equal."""
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
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
    ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)  # (Tq, Tk)
    if key_padding_mask is not None:
        ok = ok & (key_padding_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :]))
    logits = logits.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def _sdpa(q, k, v, *, causal, key_padding_mask, window, sparsity, scale):
    Tq, Tk, H = q.shape[2], k.shape[2], q.shape[1]
    gqa = H != k.shape[1]
    if key_padding_mask is None and window is None and sparsity is None and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if key_padding_mask is None and window is None and sparsity is None and not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    k_pos = torch.arange(Tk, device=q.device)
    ok = allowed_mask(q_pos, k_pos, causal=causal, window=window, sparsity=sparsity)
    if key_padding_mask is not None:
        ok = ok & (key_padding_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, scale=scale, enable_gqa=gqa)


def attention(
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
    backend: str = "auto",
) -> Tensor:
    """Attention over (batch, heads, seq, head_dim) tensors; see the module docstring for semantics.

    ``dropout_p`` drops attention probabilities with masks drawn from ``generator`` (or the
    global RNG, which follows ``vmap(randomness=...)``); it runs on the math path.
    """
    _check(q, k, v, key_padding_mask, window, scale)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, window=window, sparsity=sparsity, scale=scale)
    sdpa_ok = relative_bias is None and dropout_p == 0.0 and q.dtype == k.dtype == v.dtype
    if backend == "sdpa":
        if not sdpa_ok:
            raise ValueError(
                "backend='sdpa' cannot run this call: "
                + ("relative_bias is set" if relative_bias is not None else "dropout with an explicit mask")
                + "; use backend='math' or 'auto'"
            )
        return _sdpa(q, k, v, **kwargs)
    if backend == "auto" and sdpa_ok and not forward_ad_active():
        return _sdpa(q, k, v, **kwargs)
    return reference(q, k, v, relative_bias=relative_bias, dropout_p=dropout_p, generator=generator, **kwargs)
