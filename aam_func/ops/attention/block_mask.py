"""Block masks: which tiles of a ``mask_mod`` are empty, full or partial, computed once per shape.

:func:`create_block_mask` takes FlexAttention's arguments ``(mask_mod, B, H, Q_LEN, KV_LEN,
device, BLOCK_SIZE)`` and evaluates the mask a row of tiles at a time (O(BLOCK_SIZE · KV_LEN)
memory), recording per (batch, head, query tile, key tile) whether no pair, every pair or some
pairs are allowed. The blockwise kernel then skips the empty tiles, reads no mask for the full
ones and calls ``mask_mod`` only on the partial ones. A :class:`BlockMask` is plain data: build
it once per batch and pass it to every layer; the backward and jvp of each call reuse the
same one (it travels in the kernel's static options).

Under ``vmap`` (batched mask values) or while compiling, the mask's values cannot be read into
a tile plan; the block mask then marks every tile partial (nothing skipped, still exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...checks import check_int
from .._util import values_inspectable
from .mods import check_mask_mod, index_grid

__all__ = ["BlockMask", "create_block_mask", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A mask_mod with its tile states. ``shape`` (B, H, Q_LEN, KV_LEN): B and H may be 1 (the
    mask is the same for every batch row / head). ``states`` (B, H, n_q_tiles, n_kv_tiles) int8
    of EMPTY/PARTIAL/FULL, or None when the values could not be read (every tile partial).
    ``plan[i]``: the key tiles query tile i visits, as (tile index, full) pairs, over all
    batch rows and heads."""

    mask_mod: Callable
    shape: tuple
    block_size: tuple
    states: Optional[Tensor]
    plan: tuple = field(repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # e.g. FlexAttention's own block mask, per use

    @property
    def sparsity(self) -> float:
        """The fraction of (query tile, key tile) pairs the kernel skips."""
        nq, nk = len(self.plan), -(-self.shape[3] // self.block_size[1])
        return 1.0 - sum(len(r) for r in self.plan) / (nq * nk)

    def check_call(self, B: int, H: int, Tq: int, Tk: int) -> None:
        """A clear error when this block mask was built for another call's shape."""
        b, h, q, kv = self.shape
        if (q, kv) != (Tq, Tk) or b not in (1, B) or h not in (1, H):
            raise ValueError(
                f"block_mask was built for shape (B, H, Q_LEN, KV_LEN) = {self.shape}, but this call has "
                f"{(B, H, Tq, Tk)} (B and H may be 1 in the block mask); build it with create_block_mask for this shape"
            )

    def __repr__(self) -> str:
        return f"BlockMask(shape={self.shape}, block_size={self.block_size}, sparsity={self.sparsity:.1%})"


def _row_states(mask_mod, B: int, H: int, qs: int, qe: int, KV: int, bk: int, device) -> Tensor:
    """(B, H, n_kv_tiles) states of query tile [qs, qe)."""
    b, h, qi, ki = index_grid(B, H, qe - qs, KV, device, q_start=qs)
    ok = mask_mod(b, h, qi, ki).expand(B, H, qe - qs, KV)
    pad = -KV % bk  # pad the last tile: False for "any", True for "all"
    tiles = (B, H, qe - qs, -1, bk)
    anyv = (F.pad(ok, (0, pad), value=False) if pad else ok).reshape(tiles).any(-1).any(-2)
    allv = (F.pad(ok, (0, pad), value=True) if pad else ok).reshape(tiles).all(-1).all(-2)
    return torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)


def create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                      device="cpu", BLOCK_SIZE=128) -> BlockMask:
    """FlexAttention's ``create_block_mask``: the tile states of ``mask_mod`` for (B, H, Q_LEN,
    KV_LEN) (B, H None: 1, the same mask for every batch row / head), tiles of ``BLOCK_SIZE``
    (an int, or (query, key) sizes)."""
    check_mask_mod(mask_mod, device=device)
    B, H = B or 1, H or 1
    for name, val in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        check_int(name, val, min=1)
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    check_int("BLOCK_SIZE (query)", bq, min=1)
    check_int("BLOCK_SIZE (key)", bk, min=1)
    nq, nk = -(-Q_LEN // bq), -(-KV_LEN // bk)
    if not values_inspectable():  # batched or traced mask values: every tile partial
        plan = tuple(tuple((j, False) for j in range(nk)) for _ in range(nq))
        return BlockMask(mask_mod, (B, H, Q_LEN, KV_LEN), (bq, bk), None, plan)
    with torch.no_grad():
        states = torch.stack([_row_states(mask_mod, B, H, qs, min(qs + bq, Q_LEN), KV_LEN, bk, device)
                              for qs in range(0, Q_LEN, bq)], dim=2)  # (B, H, nq, nk)
        visit = (states != EMPTY).any(0).any(0).tolist()
        full = (states == FULL).all(0).all(0).tolist()
    plan = tuple(tuple((j, full[i][j]) for j in range(nk) if visit[i][j]) for i in range(nq))
    return BlockMask(mask_mod, (B, H, Q_LEN, KV_LEN), (bq, bk), states, plan)
