"""Per-example clipping arithmetic shared by both routes and DP-SGD: norms, factors, weighted sums.

    w_i = min(1, C / (‖g_i‖ + eps))      ‖w_i g_i‖ < C always; w_i = 1 when C = inf
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..checks import check_number

__all__ = ["CLIP_EPS", "squared_norms", "global_norms", "clip_factors", "weighted_sum", "check_max_norm"]

CLIP_EPS = 1e-6  # w_i = min(1, C / (‖g_i‖ + eps)), as Opacus: keeps ‖w_i g_i‖ < C and no 0/0


def squared_norms(per_example) -> Tensor:
    """(B,) float32 Σ over leaves of ‖x_i‖², for a pytree whose leaves carry a leading batch dim."""
    sq = [x.reshape(x.shape[0], -1).float().pow(2).sum(1) for x in pytree.tree_leaves(per_example)]
    return torch.stack(sq).sum(0)


def global_norms(per_example) -> Tensor:
    """(B,) global L2 norms of a tree whose leaves carry a leading batch dim."""
    return squared_norms(per_example).sqrt()


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """w_i = min(1, C / (‖g_i‖ + 1e-6)): ‖w_i g_i‖ ≤ C always, w_i = 1 when C = inf."""
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def weighted_sum(weights: Tensor, per_example):
    """Σ_i w_i g_i over the leading dim of every leaf (the same pytree structure)."""
    return pytree.tree_map(lambda x: torch.tensordot(weights.to(x.dtype), x, dims=1), per_example)


def check_max_norm(max_norm) -> float:
    """The clipping bound C: a number > 0 (``float('inf')`` disables clipping)."""
    return check_number("max_norm", max_norm, min=0, min_open=True, finite=False)
