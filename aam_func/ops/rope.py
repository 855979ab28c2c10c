"""Rotary position embedding (Su et al. 2021, RoFormer) as a custom op.

``rope(x, positions)`` rotates each channel pair of x (batch, heads, seq, head_dim) by the angle
θ[p, i] = p · base^(-2i/head_dim). Writing J for the 90° rotation of every pair, the op is

    y = cos(θ) ∘ x + sin(θ) ∘ J x        (R_θ x)

and since every R_θ is orthogonal, the backward is the inverse rotation
``dx = cos(θ) ∘ dy − sin(θ) ∘ J dy = R_{−θ} dy``: nothing is saved but ``positions`` (the angles
are recomputed), and the jvp is ``R_θ dx``. See proofs/rope.md.

- ``layout="half"`` pairs channel i with i + d/2 (HF LLaMA / GPT-NeoX ``rotate_half``);
  ``layout="interleaved"`` pairs 2i with 2i+1 (RoFormer). They differ by a fixed channel permutation.
- ``positions`` is (seq,), (batch, seq), or an int offset meaning ``arange(offset, offset + seq)``
  (decoding against a KV cache of ``offset`` earlier tokens).
- ``scaling`` extends the context: ``("linear", s)`` divides positions by s (position
  interpolation, Chen et al. 2023); ``("ntk", s)`` raises the base to base · s^(d/(d−2))
  (NTK-aware scaling, bloc97 2023). A dict ``{"type": "linear", "factor": 2.0}`` (the HF
  ``rope_scaling`` form) is accepted too.

Angles are computed in float32 and cast to x's dtype, as HF LLaMA does; for float64 x they are
computed in float64 (a float32 angle table would cap a float64 model at float32 accuracy, and
CPU and CUDA float32 cos/sin differ in the last bit).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .registry import OpSpec, register
from ..checks import check_choice, check_int, check_number, is_int

__all__ = ["rope", "reference", "rope_cos_sin", "LAYOUTS"]

LAYOUTS = ("half", "interleaved")
SCALINGS = ("linear", "ntk")


def _parse_scaling(scaling) -> Optional[tuple[str, float]]:
    if scaling is None:
        return None
    if isinstance(scaling, dict):
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = scaling.get("factor")
    elif isinstance(scaling, (tuple, list)) and len(scaling) == 2:
        kind, factor = scaling
    else:
        raise ValueError(f"rope scaling must be None, (kind, factor) or {{'type': kind, 'factor': f}}, got {scaling!r}")
    check_choice("rope scaling kind", kind, SCALINGS)
    return kind, check_number("rope scaling factor", factor, min=0, min_open=True)


def _check(x: Tensor, positions, base: float, layout: str, scaling) -> tuple[Tensor, Optional[tuple[str, float]]]:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"rope expects x shaped (batch, heads, seq, head_dim), got {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise TypeError(f"rope expects a floating x, got dtype {x.dtype}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    check_choice("rope layout", layout, LAYOUTS)
    check_number("rope base", base, min=0, min_open=True)
    B, _, T, _ = x.shape
    if is_int(positions):
        check_int("rope position offset", positions, min=0)
        positions = torch.arange(positions, positions + T, device=x.device)
    if not isinstance(positions, Tensor):
        raise TypeError(f"rope positions must be a Tensor or an int offset, got {type(positions).__name__}")
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"rope positions must be integer or real, got dtype {positions.dtype}")
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(f"rope positions must be (seq,) or (batch, seq) = {(B, T)}, got {tuple(positions.shape)}")
    return positions, _parse_scaling(scaling)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, layout: str, scaling, dtype) -> tuple[Tensor, Tensor]:
    """cos θ and sin θ expanded to full head_dim in the layout's channel order: (T, d) or (B, 1, T, d)."""
    if scaling is not None and scaling[0] == "ntk":
        base = base * scaling[1] ** (head_dim / (head_dim - 2)) if head_dim > 2 else base
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=acc, device=positions.device) / head_dim)
    pos = positions.to(acc)
    if scaling is not None and scaling[0] == "linear":
        pos = pos / scaling[1]
    ang = pos[..., None] * inv_freq  # (..., d/2)
    if ang.dim() == 3:
        ang = ang[:, None]  # (B, 1, T, d/2)
    if layout == "half":
        ang = torch.cat([ang, ang], dim=-1)
    else:
        ang = ang.repeat_interleave(2, dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(x: Tensor, layout: str) -> Tensor:
    """J x: each pair (a, b) -> (−b, a)."""
    if layout == "half":
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    # reshape, not flatten: gradcheck's batched forward-grad check runs under the legacy vmap,
    # which has no batching rule for flatten.
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)


class _RopeFunction(torch.autograd.Function):
    """y = R_θ x; backward R_θᵀ dy = R_{−θ} dy; jvp R_θ dx. Saves only positions."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, positions, base, layout, scaling):
        cos, sin = rope_cos_sin(positions, x.shape[-1], base, layout, scaling, x.dtype)
        return x * cos + _rotate(x, layout) * sin

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, positions, base, layout, scaling = inputs
        ctx.save_for_backward(positions)
        ctx.save_for_forward(positions)
        ctx.meta = (x.shape[-1], base, layout, scaling, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        d, base, layout, scaling, dtype = ctx.meta
        cos, sin = rope_cos_sin(positions, d, base, layout, scaling, dy.dtype)
        return dy * cos - _rotate(dy, layout) * sin, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, _dpos, _base, _layout, _scaling):
        (positions,) = ctx.saved_tensors
        d, base, layout, scaling, dtype = ctx.meta
        cos, sin = rope_cos_sin(positions, d, base, layout, scaling, dx.dtype)
        return dx * cos + _rotate(dx, layout) * sin


def rope(
    x: Tensor,
    positions: Union[Tensor, int],
    *,
    base: float = 10000.0,
    layout: str = "half",
    scaling=None,
) -> Tensor:
    """Rotate channel pairs of x (batch, heads, seq, head_dim) by position-dependent angles.

    Equals :func:`reference` (bitwise) and, for ``layout="half"``, HF LLaMA's
    ``apply_rotary_pos_emb``; the backward recomputes the angles from
    ``positions`` instead of saving cos/sin tables. Positions carry no gradient.
    """
    positions, sc = _check(x, positions, base, layout, scaling)
    return _RopeFunction.apply(x, positions, float(base), layout, sc)


def reference(
    x: Tensor,
    positions: Union[Tensor, int],
    *,
    base: float = 10000.0,
    layout: str = "half",
    scaling=None,
) -> Tensor:
    """The plain composite rotation (autograd-differentiated): the same formula as the layer's rope."""
    positions, sc = _check(x, positions, base, layout, scaling)
    d = x.shape[-1]
    if sc is not None and sc[0] == "ntk" and d > 2:
        base = base * sc[1] ** (d / (d - 2))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=acc, device=x.device) / d)
    pos = positions.to(acc)
    if sc is not None and sc[0] == "linear":
        pos = pos / sc[1]
    ang = pos[..., None] * inv_freq  # (T, d/2) or (B, T, d/2)
    if ang.dim() == 3:
        ang = ang[:, None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if layout == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _samples() -> list:
    g = torch.Generator().manual_seed(0)
    x = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return [
        ((x(1, 2, 3, 4), torch.arange(3)), {}),
        ((x(2, 1, 3, 4), torch.tensor([[0, 1, 2], [5, 6, 7]])), {"layout": "interleaved"}),
        ((x(1, 1, 2, 6), 4), {"scaling": ("linear", 2.0)}),
        ((x(1, 2, 2, 4), torch.arange(2)), {"layout": "interleaved", "scaling": ("ntk", 4.0), "base": 100.0}),
    ]


register(OpSpec(name="rope", function=_RopeFunction, op=rope, reference=reference, proof="proofs/rope.md",
                samples=_samples, supports_forward_ad=True, supports_double_backward=True))
