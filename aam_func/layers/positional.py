"""Positional encodings: sinusoidal (Vaswani et al. 2017), learnable tables, and rotary (Su et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import init as initializers
from ..tree import Params

__all__ = ["sinusoidal_table", "SinusoidalPositions", "LearnablePositions", "rope_angles", "rope"]


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0, dtype=torch.float32) -> Tensor:
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)). (...,) -> (..., dim)."""
    half = (dim + 1) // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device) * (-2.0 * math.log(base) / dim))
    ang = positions.to(torch.float32)[..., None] * freq  # (..., half)
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
        return x + params["weight"][positions]


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """θ[p, i] = p · base^(-2i/head_dim) for i < head_dim/2. (...,) -> (..., head_dim/2), float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    return positions.to(torch.float32)[..., None] * inv_freq


def rope(x: Tensor, positions: Tensor, *, base: float = 10000.0, layout: str = "half") -> Tensor:
    """Rotate channel pairs of x (batch, heads, seq, head_dim) by position-dependent angles.

    ``layout="half"`` pairs channel i with i + d/2 (HF LLaMA, GPT-NeoX); ``"interleaved"`` pairs
    2i with 2i+1 (RoFormer). ``positions`` is (seq,) or (batch, seq).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    ang = rope_angles(positions, d, base)  # (T, d/2) or (B, T, d/2)
    if ang.dim() == 3:
        ang = ang[:, None]  # (B, 1, T, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if layout == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")
