"""Loss functions, pure and numerically stable (log-sum-exp, log1p/expm1, float32 accumulation).

- :func:`lm_loss`, :func:`shift_labels`: the language-model loss (cross-entropy, optional label
  smoothing and focal modulation) over next-token targets.
- :func:`focal_loss` (Lin et al. 2017), :func:`label_smoothing_loss` (Szegedy et al. 2016),
  :func:`contrastive_loss` (Khosla et al. 2020 SupCon; Hadsell et al. 2006 margin form),
  :func:`triplet_loss` (Schroff et al. 2015; Balntas et al. 2016 swap).

Derivations and the tests that check each claim: proofs/losses.md.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.cross_entropy import REDUCTIONS, check_class_ids
from .checks import check_choice, check_number

__all__ = [
    "lm_loss",
    "shift_labels",
    "count_targets",
    "mask_document_starts",
    "focal_loss",
    "label_smoothing_loss",
    "contrastive_loss",
    "triplet_loss",
    "REDUCTIONS",
]



# ----------------------------------------------------------------------------- validation
def _check_class_inputs(name: str, logits: Tensor, targets: Tensor, ignore_index: int) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name}: logits must be a floating Tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"{name}: targets must be an integer Tensor of class ids, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name}: logits (..., C) and targets (...) disagree: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    C = logits.shape[-1]
    if C == 0:
        raise ValueError(f"{name}: logits have no classes (last dim 0)")
    check_class_ids(f"{name}: targets", targets, C, ignore_index)


def _check_prob(name: str, value: float) -> None:
    check_number(name, value, min=0, max=1, max_open=True)


def _reduce(per: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Ignored entries are 0; "mean" divides by the number of valid ones (0 when there are none)."""
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _acc(x: Tensor) -> Tensor:
    """Accumulate in float32 at least (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- LM loss
def shift_labels(labels: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position and padded
    positions (attention_mask == 0) get ``ignore_index``. (batch, seq) -> (batch, seq)."""
    if attention_mask is not None:
        labels = labels.masked_fill(~attention_mask, ignore_index)
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def mask_document_starts(labels: Tensor, document_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """Document masking: ``labels`` with ``ignore_index`` at the first token of each document
    after the first, so the cross-document target at each boundary (the last token of a
    document predicting the next document's first) counts in no loss. (batch, seq) -> (batch, seq)."""
    start = torch.zeros_like(document_ids, dtype=torch.bool)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return labels.masked_fill(start, ignore_index)


def count_targets(labels: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """How many next-token targets an LM batch has: the entries of ``shift_labels(labels,
    attention_mask)`` other than ``ignore_index`` (int64, 0-d). The one rule for -100 labels and
    padding, shared by the loss's mean, evaluation's token weights and data-parallel weights."""
    mask = None if attention_mask is None else attention_mask.bool()
    return (shift_labels(labels, mask, ignore_index) != ignore_index).sum().to(torch.int64)


def lm_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    focal_alpha: float = 1.0,
    focal_gamma: float = 0.0,
) -> Tensor:
    """Mean token cross-entropy over targets != ignore_index, accumulated in float32.

    logits (..., V), targets (...) already shifted. With every target ignored the loss is 0
    (a defined value, with zero gradient), not NaN. ``focal_gamma > 0`` or ``focal_alpha != 1``
    turn it into the focal loss (the config's ``focal_loss_alpha`` / ``focal_loss_gamma``): each
    token's (smoothed) cross-entropy is weighted by α (1 − p_t)^γ; the defaults are plain CE.
    """
    if focal_gamma != 0.0 or focal_alpha != 1.0:
        return focal_loss(
            logits, targets, alpha=focal_alpha, gamma=focal_gamma, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction="mean",
        )
    flat_logits = _acc(logits.reshape(-1, logits.shape[-1]))
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


# ----------------------------------------------------------------------------- focal
def focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: Union[float, Tensor] = 1.0,
    gamma: float = 2.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Multiclass softmax focal loss (Lin et al. 2017): FL = −α_t (1 − p_t)^γ log p_t.

    logits (..., C), targets (...). ``alpha`` is a scalar or a per-class tensor (C,) (α_t =
    alpha[target]); ``gamma = 0`` gives α-weighted cross-entropy. "mean" averages over the
    non-ignored targets (not weighted by α; 0 when every target is ignored). With
    ``label_smoothing`` ε the modulated term is the smoothed CE (1−ε)(−log p_t) + ε·mean_j(−log p_j).
    log p comes from log_softmax in float32 and 1 − p_t = −expm1(log p_t), exact near p_t = 1.
    """
    _check_class_inputs("focal_loss", logits, targets, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_prob("label_smoothing", label_smoothing)
    check_number("focal_loss gamma", gamma, min=0)
    C = logits.shape[-1]
    if isinstance(alpha, Tensor):
        if tuple(alpha.shape) not in ((), (C,)):
            raise ValueError(f"focal_loss alpha must be a scalar or a (C,) = ({C},) tensor, got shape {tuple(alpha.shape)}")
    else:
        check_number("focal_loss alpha (a number or a per-class tensor)", alpha, min=0)
    logp = F.log_softmax(_acc(logits), dim=-1)  # (..., C)
    valid = targets != ignore_index
    t = torch.where(valid, targets, torch.zeros_like(targets))
    logp_t = logp.gather(-1, t[..., None]).squeeze(-1)
    ce = -logp_t
    if label_smoothing:
        ce = (1.0 - label_smoothing) * ce - label_smoothing * logp.mean(-1)
    if gamma:
        # (1 − p_t)^γ; the clamp keeps the gradient finite (0, not 0·∞) where p_t rounds to 1.
        one_minus = (-torch.expm1(logp_t)).clamp_min(torch.finfo(logp.dtype).tiny)
        ce = one_minus.pow(gamma) * ce
    if isinstance(alpha, Tensor):
        a = alpha.to(logp.dtype)
        ce = (a[t] if a.dim() else a) * ce
    elif alpha != 1.0:
        ce = alpha * ce
    return _reduce(ce, valid, reduction)


def label_smoothing_loss(
    logits: Tensor,
    targets: Tensor,
    smoothing: float = 0.1,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Cross-entropy against (1 − ε)·onehot + ε/C (Szegedy et al. 2016); equals
    ``F.cross_entropy(label_smoothing=ε)``, except that "mean" with every target ignored is 0."""
    _check_class_inputs("label_smoothing_loss", logits, targets, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_prob("smoothing", smoothing)
    logp = F.log_softmax(_acc(logits), dim=-1)
    valid = targets != ignore_index
    t = torch.where(valid, targets, torch.zeros_like(targets))
    per = -(1.0 - smoothing) * logp.gather(-1, t[..., None]).squeeze(-1)
    if smoothing:  # skipped at 0 like torch: 0 · (−inf) would be NaN for a −inf logit
        per = per - smoothing * logp.mean(-1)
    return _reduce(per, valid, reduction)


# ----------------------------------------------------------------------------- metric learning
def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    margin: float = 1.0,
    *,
    kind: str = "supcon",
) -> Tensor:
    """A contrastive loss over a batch of embeddings (n, d) with class labels (n,).

    ``kind="supcon"`` (Khosla et al. 2020, L_out): with u_i = e_i / ‖e_i‖ and s_ij = u_i·u_j / τ,
        L_i = −1/|P(i)| Σ_{p∈P(i)} [ s_ip − log Σ_{a≠i} exp s_ia ],   P(i) = {p ≠ i : y_p = y_i},
    averaged over anchors with |P(i)| > 0. Anchors without positives are skipped; with none at
    all the loss is 0 (zero gradient), never NaN.
    ``kind="margin"`` (Hadsell et al. 2006) over all pairs i < j, d_ij = ‖e_i − e_j‖₂ (raw embeddings):
        L = mean_{i<j} [ y_ij d_ij² + (1 − y_ij) max(0, m − d_ij)² ],   y_ij = [y_i = y_j];
    0 for fewer than two embeddings.
    """
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point() or embeddings.dim() != 2:
        raise ValueError(f"contrastive_loss: embeddings must be a floating (n, d) tensor, got {getattr(embeddings, 'shape', embeddings)}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (embeddings.shape[0],):
        raise ValueError(f"contrastive_loss: labels must be shaped (n,) = ({embeddings.shape[0]},), got {getattr(labels, 'shape', labels)}")
    if kind not in ("supcon", "margin"):
        raise ValueError(f"contrastive_loss kind must be 'supcon' or 'margin', got {kind!r}")
    check_number("contrastive_loss temperature", temperature, min=0, min_open=True)
    check_number("contrastive_loss margin", margin, min=0)
    e = _acc(embeddings)
    n = e.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    if kind == "margin":
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=e.device), diagonal=1)
        diff = e[:, None, :] - e[None, :, :]
        # sqrt'(0) is infinite: take d² directly for positives, and sqrt(d² + tiny) for the hinge.
        d2 = diff.pow(2).sum(-1)
        d = torch.sqrt(d2 + torch.finfo(e.dtype).tiny)
        per = torch.where(same, d2, F.relu(margin - d).pow(2))
        per = torch.where(upper, per, torch.zeros_like(per))
        return per.sum() / upper.sum().clamp(min=1).to(per.dtype)
    u = F.normalize(e, dim=-1, eps=1e-12)
    s = (u @ u.t()) / temperature  # (n, n)
    s = s.masked_fill(eye, float("-inf"))
    log_prob = s - torch.logsumexp(s, dim=-1, keepdim=True)  # row i: log softmax over a != i
    pos = same & ~eye
    n_pos = pos.sum(-1)
    pos_logp = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(-1)
    has = n_pos > 0
    per_anchor = -pos_logp / n_pos.clamp(min=1).to(pos_logp.dtype)
    per_anchor = torch.where(has, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / has.sum().clamp(min=1).to(per_anchor.dtype)


def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    swap: bool = False,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """max(0, d(a, p) − d(a, n) + margin), d(x, y) = ‖x − y + eps‖_p (Schroff et al. 2015).

    ``swap`` uses min(d(a, n), d(p, n)) as the negative distance (Balntas et al. 2016). Equals
    ``F.triplet_margin_loss`` (same eps convention; margin = 0 is allowed here, torch refuses it). Inputs (..., d) of equal shape; an empty
    batch gives 0.
    """
    for name, x in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"triplet_loss: {name} must be a floating Tensor")
    if anchor.shape != positive.shape or anchor.shape != negative.shape or anchor.dim() < 1:
        raise ValueError(
            f"triplet_loss: anchor, positive, negative must share a shape (..., d); got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    check_number("triplet_loss margin", margin, min=0)
    check_number("triplet_loss p", p, min=0, min_open=True, finite=False)
    check_choice("reduction", reduction, REDUCTIONS)
    dist = lambda x, y: torch.linalg.vector_norm(x - y + eps, ord=p, dim=-1)  # noqa: E731
    d_ap, d_an = dist(anchor, positive), dist(anchor, negative)
    if swap:
        d_an = torch.minimum(d_an, dist(positive, negative))
    per = F.relu(d_ap - d_an + margin)
    if reduction == "none":
        return per
    if reduction == "sum" or per.numel() == 0:  # an empty batch: 0 (torch's mean would be NaN)
        return per.sum()
    return per.mean()
