"""Additive positional encodings: sinusoidal (Vaswani et al. 2017) and learnable tables.

Rotary embeddings (Su et al. 2021) rotate q and k inside attention: :func:`aam_func.ops.rope.rope`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import init as initializers
from ..tree import Params

__all__ = ["sinusoidal_table", "SinusoidalPositions", "LearnablePositions"]


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0, dtype=torch.float32) -> Tensor:
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)). (...,) -> (..., dim).

    Computed in float32 (float64 when ``dtype`` is float64) and cast to ``dtype``."""
    half = (dim + 1) // 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    freq = torch.exp(torch.arange(half, dtype=acc, device=positions.device) * (-2.0 * math.log(base) / dim))
    ang = positions.to(acc)[..., None] * freq  # (..., half)
    pe = torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)[..., :dim]
    return pe.to(dtype)


@dataclass(frozen=True)
class SinusoidalPositions:
    """Fixed sinusoidal encodings, added to the input; no parameters."""

    dim: int
    max_len: int

    def init(self, generator: Optional[torch.Generator] = None) -> Params:
        return {}

    def apply(self, params: Params, x: Tensor, positions: Tensor) -> Tensor:
        return x + sinusoidal_table(positions, self.dim, dtype=x.dtype)


@dataclass(frozen=True)
class LearnablePositions:
    """A learned table (max_len, dim) added to the input; ``init="sinusoidal"`` starts it from sinusoids."""

    dim: int
    max_len: int
    std: float = 0.02
    weight_init: str = "normal"

    def init(self, generator: torch.Generator) -> Params:
        if self.weight_init == "sinusoidal":
            return {"weight": sinusoidal_table(torch.arange(self.max_len), self.dim)}
        if self.weight_init != "normal":
            raise ValueError(f"LearnablePositions weight_init must be 'normal' or 'sinusoidal', got {self.weight_init!r}")
        return {"weight": initializers.normal((self.max_len, self.dim), generator, std=self.std)}

    def apply(self, params: Params, x: Tensor, positions: Tensor) -> Tensor:
        # index_select, not weight[positions]: the indexing backward (index_put_ with accumulate)
        # adds repeated positions (per-document positions, issue 20) in a thread-dependent order
        # on the CPU; index_add adds them in index order, so gradients are bitwise reproducible.
        w = params["weight"]
        return x + w.index_select(0, positions.reshape(-1)).reshape(*positions.shape, w.shape[-1])
