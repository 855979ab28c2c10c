"""A supervised problem split where the curvature needs it: a model ``apply(params, inputs) ->
outputs`` (the network function f) and a likelihood on the outputs (the loss ℓ).

    problem = Problem(lambda p, x: model.apply(p, x)["logits"], loss="cross_entropy")

``outputs`` are (B, ..., C): B examples, any number of rows per example (tokens, pixels), C
classes or regression targets. ``loss="cross_entropy"``: ``targets`` (B, ...) class ids, rows
whose target is ``ignore_index`` count for nothing; ``loss="mse"``: ``targets`` shaped like the
outputs, ℓ = Σ (f - y)². ``reduction="mean"`` divides by the counted rows (cross-entropy) or
the elements (mse), as ``torch.nn.functional`` does; ``"sum"`` does not. That divisor is the
problem's *scale* c, and every curvature here is c·Σ_rows (per-row curvature), so products over
chunks of a batch add up to the product over the batch (the scale is taken over the whole
batch). Derivations: ``proofs/curvature.md`` §1.

Per-row pieces, all closed form:

- ``output_hessian_vp``: H_f u, with H = diag(p) - p pᵀ (cross-entropy), 2·I (mse), times c;
- ``output_sqrt``: the C columns S_k with Σ_k S_k S_kᵀ = H (per row);
- ``output_grads``: ∇_f ℓ at given targets (unscaled), and ``sample_targets`` y ~ p(y | f).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_choice, check_int

__all__ = ["Problem", "LOSSES", "REDUCTIONS"]

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class Problem:
    """``apply(params, inputs) -> outputs`` (B, ..., C) and its likelihood; see the module doc."""

    apply: Callable
    loss: str = "cross_entropy"
    reduction: str = "mean"
    ignore_index: int = -100

    def __post_init__(self):
        if not callable(self.apply):
            raise TypeError(f"Problem.apply must be callable apply(params, inputs), got {type(self.apply).__name__}")
        check_choice("loss", self.loss, LOSSES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_int("ignore_index", self.ignore_index)

    # ------------------------------------------------------------------ checks and scale
    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Shapes and kinds of ``outputs`` against ``targets``: a ValueError naming the mismatch."""
        if not isinstance(outputs, Tensor) or outputs.dim() < 2:
            raise ValueError(f"outputs must be a (B, ..., C) tensor, got {getattr(outputs, 'shape', type(outputs))}")
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        if self.loss == "cross_entropy":
            if targets.shape != outputs.shape[:-1] or targets.is_floating_point():
                raise ValueError(f"targets must be integer class ids of shape {tuple(outputs.shape[:-1])} for "
                                 f"outputs {tuple(outputs.shape)}, got {targets.dtype} {tuple(targets.shape)}")
        elif targets.shape != outputs.shape:
            raise ValueError(f"targets must have the outputs' shape {tuple(outputs.shape)} for loss='mse', "
                             f"got {tuple(targets.shape)}")

    def mask(self, targets: Tensor, outputs: Tensor) -> Tensor:
        """(B, ...) rows that count, as the outputs' dtype (cross-entropy: target != ignore_index)."""
        if self.loss == "cross_entropy":
            return (targets != self.ignore_index).to(outputs.dtype)
        return torch.ones(outputs.shape[:-1], dtype=outputs.dtype, device=outputs.device)

    def count(self, targets: Tensor) -> int:
        """What ``reduction="mean"`` divides by for these targets (the whole batch's)."""
        if self.loss == "cross_entropy":
            return int((targets != self.ignore_index).sum())
        return targets.numel()

    def scale(self, targets: Tensor) -> float:
        """c: 1 / count for ``"mean"`` (an error when nothing counts), 1 for ``"sum"``."""
        if self.reduction == "sum":
            return 1.0
        n = self.count(targets)
        if n == 0:
            raise ValueError(f"every target is ignore_index={self.ignore_index}: the mean loss is undefined")
        return 1.0 / n

    # ------------------------------------------------------------------ per-row pieces
    def loss_value(self, outputs: Tensor, targets: Tensor, scale: Optional[float] = None) -> Tensor:
        """c · Σ_rows ℓ(f_row, y_row): the loss as ``torch.nn.functional`` computes it when
        ``scale`` is None (the batch's own), else with the given c (chunks of one batch)."""
        self.check(outputs, targets)
        c = self.scale(targets) if scale is None else scale
        if self.loss == "cross_entropy":
            flat = outputs.reshape(-1, outputs.shape[-1])
            total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=self.ignore_index, reduction="sum")
        else:
            total = (outputs - targets).pow(2).sum()
        return c * total

    def probs(self, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs, dim=-1)

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, u: Tensor, scale: float) -> Tensor:
        """c · H_row u_row for every row (u shaped like the outputs); ignored rows give zero."""
        m = self.mask(targets, outputs).unsqueeze(-1)
        if self.loss == "cross_entropy":
            p = self.probs(outputs)
            hu = p * u - p * (p * u).sum(-1, keepdim=True)
        else:
            hu = 2 * u
        return scale * m * hu

    def output_sqrt(self, outputs: Tensor, targets: Tensor, scale: float) -> Tensor:
        """(C, *outputs.shape) columns S_k with Σ_k S_k S_kᵀ = c·H per row (ignored rows zero):
        cross-entropy S_k = √c (√p_k e_k - p √p_k) (Σ p = 1 makes S Sᵀ = diag p - p pᵀ);
        mse S_k = √(2c) e_k."""
        C = outputs.shape[-1]
        m = self.mask(targets, outputs).unsqueeze(-1)
        eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device).reshape((C,) + (1,) * (outputs.dim() - 1) + (C,))
        if self.loss == "cross_entropy":
            p = self.probs(outputs)
            sq = p.sqrt()
            sq_k = sq.movedim(-1, 0).unsqueeze(-1)  # (C, ..., 1)
            cols = sq_k * eye - p.unsqueeze(0) * sq_k
        else:
            cols = (2.0 ** 0.5) * eye.expand((C,) + tuple(outputs.shape))
        return (scale ** 0.5) * m.unsqueeze(0) * cols

    def output_grads(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """∇_f ℓ(f_row, y_row) per row, unscaled (ignored rows zero): p - onehot(y) or 2 (f - y)."""
        m = self.mask(targets, outputs).unsqueeze(-1)
        if self.loss == "cross_entropy":
            safe = torch.where(targets == self.ignore_index, torch.zeros_like(targets), targets)
            return m * (self.probs(outputs) - F.one_hot(safe, outputs.shape[-1]).to(outputs.dtype))
        return 2 * (outputs - targets)

    def sample_targets(self, outputs: Tensor, generator: Optional[torch.Generator] = None, samples: int = 1) -> Tensor:
        """(samples, ...) draws y ~ p(y | f) per row: a class from softmax(f), or f + N(0, ½) for
        mse (the Gaussian whose negative log-likelihood is (f - y)² up to a constant)."""
        if self.loss == "cross_entropy":
            p = self.probs(outputs.detach()).reshape(-1, outputs.shape[-1])
            y = torch.multinomial(p, samples, replacement=True, generator=generator)  # (rows, samples)
            return y.t().reshape((samples,) + tuple(outputs.shape[:-1]))
        noise = torch.randn((samples,) + tuple(outputs.shape), generator=generator, dtype=outputs.dtype,
                            device=outputs.device)
        return outputs.detach() + noise * (0.5 ** 0.5)
