"""Scaled dot-product attention with every variant the models use.

``attention(q, k, v, ...)`` takes q shaped (batch, heads, q_len, head_dim) and k, v shaped
(batch, kv_heads, k_len, head_dim) with ``heads % kv_heads == 0`` (grouped-query attention:
query head h reads kv head ``h // (heads // kv_heads)``). Queries are the last ``q_len``
positions of the keys (bottom-right alignment), or start at ``q_offset`` (a static KV cache).

The package, one job per module:

- :mod:`.masks`: which keys a query may read (causal, key padding, windows, sparse patterns)
  and the relative biases (Shaw, T5, ALiBi): :class:`Sparsity`, :class:`RelativeBias`.
- :mod:`.kernel`: the blockwise (flash-style) kernel :class:`BlockwiseAttention`, exact with
  O(T) extra memory, reverse- and forward-mode AD, and :func:`blockwise` to call it;
  :mod:`.tiles`: its tiling and the one tile-scores computation its three passes share.
- :mod:`.dense`: the dense paths: :func:`reference` (the math every path must equal, and the
  only one with dropout), its additive-bias ``baddbmm`` form, SDPA and xformers.
- :mod:`.mods`: ``score_mod`` / ``mask_mod`` (FlexAttention's signatures), the predefined mods,
  and how captured tensors become kernel inputs; :mod:`.block_mask`: :class:`BlockMask`, the
  tile states of a mask_mod, computed once and reused; :mod:`.flex`: the FlexAttention path.
- :mod:`.backends`: :data:`BACKENDS` and :func:`~.backends.choose_path`, the one table that
  maps a call (backend asked, device, dtype, autocast, transforms, mask and bias kinds) to
  the path that runs.

Backends a caller may ask for: ``"blockwise"``, ``"math"``, ``"sdpa"`` (no relative bias),
``"xformers"`` (standard attention, when installed), ``"triton"`` (:mod:`.triton`, every variant,
needs the triton package) and ``"auto"``: SDPA when the call needs
no mask or bias and no forward-mode AD is active (nor vmap on CUDA), else blockwise; dropout
always runs on the math path, and so does a call under CPU bf16 autocast that takes a gradient
(in its additive-bias form without padding or a relative bias). A short call with a mask_mod
alone runs, on the CPU, as SDPA with the whole dense mask (``backends.DENSE_MODS_MAX_LEN``). ``auto`` does not take the
Triton kernels until a GPU run has checked them (``backends.TRITON_AUTO``, docs/gpu.md). Derivations:
``proofs/attention.md``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ...checks import check_choice, check_int, check_number
from .backends import BACKENDS, call_facts, check_q_offset, choose_path
from .dense import dense_bias, reference, xformers
from .dense import sdpa as _sdpa  # looked up here at call time: tests wrap it to see the path taken
from . import mods
from .block_mask import BlockMask, create_block_mask
from .flex import flex as _flex  # (the module stays reachable as .flex)
from .kernel import BlockwiseAttention, blockwise
from .masks import RelativeBias, Sparsity, allowed_mask, check_relative_bias, relative_logits, t5_bucket
from . import triton as _triton  # noqa: F401 - registers the Triton op where the triton package is installed
from .mods import check_mask_mod, check_score_mod

__all__ = [
    "attention", "blockwise", "BlockwiseAttention", "Sparsity", "RelativeBias", "allowed_mask", "relative_logits",
    "t5_bucket", "reference", "BACKENDS", "BlockMask", "create_block_mask", "mods",
]


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, seq, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
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


def _check_options(q, *, window, scale, q_offset, backend, sparsity, relative_bias, dropout_p, block_q, block_k):
    check_int("window", window, min=1, allow_none=True)
    check_number("scale", scale, min=0, min_open=True, allow_none=True)
    check_q_offset(q_offset, backend)
    if relative_bias is not None and not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"relative_bias must be a RelativeBias, got {type(relative_bias).__name__}")
    check_relative_bias(relative_bias, q)
    check_number("dropout_p", dropout_p, min=0, max=1, max_open=True)
    check_choice("backend", backend, BACKENDS)
    check_int("block_q", block_q, min=1)
    check_int("block_k", block_k, min=1)
    if sparsity is not None and not isinstance(sparsity, Sparsity):
        raise TypeError(f"sparsity must be a Sparsity, got {type(sparsity).__name__}")


def _check_mods(q: Tensor, k: Tensor, score_mod, mask_mod, block_mask):
    """The mods' signatures and return types (probed on one element) and the block mask's shape,
    before any kernel runs; returns the mask_mod in force (the block mask's, when one is given)."""
    check_score_mod(score_mod, dtype=q.dtype if q.is_floating_point() else torch.float32, device=q.device)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(
                f"block_mask must be an aam_func BlockMask (ops.attention.create_block_mask, same arguments as "
                f"FlexAttention's), got {type(block_mask).__module__}.{type(block_mask).__name__}"
            )
        block_mask.check_call(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if mask_mod is not None and mask_mod is not block_mask.mask_mod:
            raise ValueError("mask_mod and block_mask disagree: pass the block mask alone (it holds its mask_mod), "
                             "or build it from this mask_mod")
        return block_mask.mask_mod
    check_mask_mod(mask_mod, device=q.device)
    return mask_mod


def _with_mods(path, q, k, v, masks, relative_bias, dropout_p, generator, block_q, block_k, score_mod, mask_mod,
               block_mask) -> Tensor:
    """Run a call with mods on its path: blockwise, math (dropout, or asked), FlexAttention, or
    SDPA with the mask_mod's dense mask (a short mask-only call on the CPU)."""
    if path == "sdpa":
        return _sdpa(q, k, v, mask_mod=mask_mod, **masks)
    if path == "flex":
        return _flex(q, k, v, causal=masks["causal"], score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
                    scale=masks["scale"])
    if path == "math":
        return reference(q, k, v, relative_bias=relative_bias, dropout_p=dropout_p, generator=generator,
                         score_mod=score_mod, mask_mod=mask_mod, **masks)
    return blockwise(q, k, v, relative_bias=relative_bias, block_q=block_q, block_k=block_k, score_mod=score_mod,
                     mask_mod=mask_mod, block_mask=block_mask, **masks)


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
    block_q: int = 128,
    block_k: int = 128,
    q_offset=None,
    score_mod: Optional[Callable] = None,
    mask_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
) -> Tensor:
    """Attention over (batch, heads, seq, head_dim) tensors; masks and biases as in :mod:`.masks`.

    ``score_mod(score, b, h, q_idx, kv_idx)``, ``mask_mod(b, h, q_idx, kv_idx)`` and
    ``block_mask`` (from :func:`create_block_mask`) have FlexAttention's signatures and meaning
    (:mod:`.mods`); they combine with the menu's masks (a pair must pass both) and run on the
    blockwise kernel (every transform), the math path, or FlexAttention on CUDA.

    ``dropout_p`` drops attention probabilities with masks drawn from ``generator`` (or the
    global RNG, which follows ``vmap(randomness=...)``); it always runs on the math path (the
    blockwise kernel has no dropout: ``backend='blockwise'`` with dropout falls back to math
    with a warning). ``block_q``/``block_k`` are the blockwise tile sizes. ``q_offset`` places
    the queries at ``q_offset + i`` (a static KV cache); backends 'math', 'sdpa' and 'auto' only.
    The path that runs is :func:`~.backends.choose_path`'s decision.
    """
    _check_shapes(q, k, v, key_padding_mask)
    _check_options(q, window=window, scale=scale, q_offset=q_offset, backend=backend, sparsity=sparsity,
                   relative_bias=relative_bias, dropout_p=dropout_p, block_q=block_q, block_k=block_k)
    mask_mod = _check_mods(q, k, score_mod, mask_mod, block_mask)
    mods = score_mod is not None or mask_mod is not None
    route = choose_path(call_facts(
        q, k, v, backend=backend, causal=causal, key_padding_mask=key_padding_mask, window=window,
        sparsity=sparsity, relative_bias=relative_bias, dropout_p=dropout_p, q_offset=q_offset, mods=mods,
        mask_only=mods and score_mod is None,
    ))
    if route.warning:
        # Python's default filter shows it once per calling location; a module-level "warned"
        # flag would hide it from every later caller (and made tests depend on their order).
        warnings.warn(route.warning, stacklevel=2)
    masks = dict(causal=causal, key_padding_mask=key_padding_mask, window=window, sparsity=sparsity, scale=scale)
    if mods:
        return _with_mods(route.path, q, k, v, masks, relative_bias, dropout_p, generator, block_q, block_k,
                          score_mod, mask_mod, block_mask)
    if route.path == "sdpa":
        return _sdpa(q, k, v, q_offset=q_offset, **masks)
    if route.path == "math":
        return reference(q, k, v, relative_bias=relative_bias, dropout_p=dropout_p, generator=generator,
                         q_offset=q_offset, **masks)
    if route.path == "dense_bias":
        return dense_bias(q, k, v, causal=causal, window=window, sparsity=sparsity, scale=scale)
    if route.path == "xformers":
        return xformers(q, k, v, **masks)
    if route.path == "triton":  # tile sizes: the Triton backend's own (ops/attention/triton)
        from .triton import triton_attention

        return triton_attention(q, k, v, relative_bias=relative_bias, q_offset=q_offset, **masks)
    return blockwise(q, k, v, relative_bias=relative_bias, block_q=block_q, block_k=block_k, **masks)
