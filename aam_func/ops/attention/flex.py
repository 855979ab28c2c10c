"""The FlexAttention path: ``torch.nn.attention.flex_attention`` for calls with mods on CUDA.

Chosen by :func:`~.backends.choose_path` only where FlexAttention serves the call (CUDA, no
forward-mode AD, no vmap, no relative bias or key padding; see ``_route_mods``). Its fused kernel
comes from ``torch.compile``; the compiled function is built once, on first use. The square
causal triangle of the menu is folded into the mask_mod; FlexAttention's own block mask is
built once per :class:`~.block_mask.BlockMask` and kept in its cache, so the layers of a model
share it as they share ours.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .block_mask import BlockMask
from .mods import and_masks, causal_mask

__all__ = ["flex"]

_COMPILED: dict = {}


def _flex_attention():
    if "fn" not in _COMPILED:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _flex_block_mask(mask: Callable, bm: Optional[BlockMask], q: Tensor, k: Tensor, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", causal, str(q.device))
    if bm is not None and key in bm.cache:
        return bm.cache[key]
    B, H = (bm.shape[0], bm.shape[1]) if bm is not None else (q.shape[0], q.shape[1])
    size = bm.block_size if bm is not None else 128
    out = create_block_mask(mask, B, H, q.shape[2], k.shape[2], device=q.device, BLOCK_SIZE=size)
    if bm is not None:
        bm.cache[key] = out
    return out


def flex(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, score_mod: Optional[Callable],
         mask_mod: Optional[Callable], block_mask: Optional[BlockMask], scale) -> Tensor:
    """FlexAttention on (B, H, T, d) tensors (GQA through ``enable_gqa``)."""
    mask = mask_mod if block_mask is None else block_mask.mask_mod
    if causal:
        mask = causal_mask if mask is None else and_masks(causal_mask, mask)
    fbm = None if mask is None else _flex_block_mask(mask, block_mask, q, k, causal)
    return _flex_attention()(q, k, v, score_mod=score_mod, block_mask=fbm, scale=scale,
                             enable_gqa=q.shape[1] != k.shape[1])
