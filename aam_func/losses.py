"""Loss functions, pure and numerically stable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lm_loss", "shift_labels"]


def shift_labels(labels: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position and padded
    positions (attention_mask == 0) get ``ignore_index``. (batch, seq) -> (batch, seq)."""
    if attention_mask is not None:
        labels = labels.masked_fill(~attention_mask, ignore_index)
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def lm_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean token cross-entropy over targets != ignore_index, accumulated in float32.

    logits (..., V), targets (...) already shifted. With every target ignored the loss is 0
    (a defined value, with zero gradient), not NaN.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.element_size() < 4:  # accumulate half precisions in float32; keep float64
        flat_logits = flat_logits.float()
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count
