"""The batched route (``method="batched"``): per-example gradients from ONE ordinary batched
forward and backward, with no vmap, for a loss that states it is a sum of independent examples.

The contract, the caller's word (as Opacus's ``loss_reduction`` is): ``loss_fn(params, batch)``
returns the (B,) vector of per-example losses, and loss_i depends on example i alone, which sits
at index i of the leading dimension of every recognised use's input and output (batch first; no
op mixes examples: no BatchNorm in training mode, no attention across the batch). Then
∂(Σ_j loss_j)/∂out_i = ∂loss_i/∂out_i for every use's output row i, so one backward of the summed
loss that stops at the uses' outputs (``torch.autograd.grad`` to their gradient edges, with the
watched weights as fresh leaves whose own gradients are never formed) gives every example's
output gradient g_i at once; the per-example gradients follow from (x_i, g_i) as in the ghost
route (:mod:`.factors`):

- ``F.linear`` / ``torch.addmm`` / ``F.embedding`` / ``F.conv1d`` / ``F.conv2d`` weights: the
  factors (g_i, x_i), G_i = Σ_t g_it x_itᵀ (a conv's x the input patches);
- their biases: Σ_t g_it; ``F.group_norm`` / ``F.layer_norm`` affine weight Σ_t x̂_it ∘ g_it
  (x̂ recomputed from the kept input) and bias Σ_t g_it.

Any other use of a parameter (an addition, ``W.t()``, a custom op) has no such formula: the
route refuses it by name (use ``method="ghost"`` or ``"vmap"``, exact for any loss). The ghost
route pays a vmapped pass (per-op batching of tiny kernels) to be exact without the contract;
this one costs about one training step. Derivation: ``proofs/ghost_modules.md`` §6.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from ..intercept import NORM_KINDS, Client, Intercept, Use
from .batching import batch_size, check_chunk, chunks, slice_batch
from .exact_ops import exact_ops
from .factors import bias_grad, factors, norm_weight_grad, norms_and_weighted_sum, write_factors

__all__ = ["BatchedUnsupported", "batched_pass", "batched_grads", "batched_norms_and_sum"]

class BatchedUnsupported(ValueError):
    """The loss or the model breaks the batched route's contract (named in the message)."""


class _Prober(Client):
    """Keeps every recognised use of a parameter, its input and the gradient edge of its output
    (where the backward stops); records every other use of a parameter."""

    bias_uses = True

    def __init__(self, B: int):
        self.B, self.records, self.others = B, [], []

    def _probe(self, use: Use) -> Tensor:
        if use.kind == "embedding" and not use.plain:
            self.others.append((use.key, "an embedding with max_norm / scale_grad_by_freq"))
            return use.run()
        if use.kind == "conv" and not use.plain:
            self.others.append((use.key, "a grouped convolution"))
            return use.run()
        out = use.run()
        # batch first: example i at index i; torch.addmm (transformers' Conv1D) sees the examples'
        # rows flattened example-major, (B·T, in), so a multiple of B is accepted there
        lead = out.shape[0] if out.dim() else 0
        if not (lead == self.B or (use.kind == "addmm" and lead and lead % self.B == 0)):
            raise BatchedUnsupported(
                f"method='batched': {use.kind}({use.key!r}) gives an output of shape {tuple(out.shape)}, whose leading "
                f"dimension is not the batch size {self.B}; the route needs every use batch-first (example i at "
                "index i). Use method='ghost' or 'vmap'"
            )
        # the edge into the op's own node: an in-place op on ``out`` later (ReLU(inplace=True))
        # re-points ``out`` at a new node but not this edge, so the gradient stays that of the
        # use's output. None: the output is not differentiable (computed under no_grad)
        edge = get_gradient_edge(out) if out.grad_fn is not None else None
        self.records.append((use, use.input.detach(), edge, (out.shape, out.dtype, out.device)))
        return out

    linear = embedding = conv = norm = _probe

    def other(self, key, tensor):
        self.others.append((key, "an op with no per-example formula"))
        return tensor


def _check_tied(flat: dict) -> None:
    if len({id(v) for v in flat.values()}) == len(flat):
        return
    count = Counter(id(v) for v in flat.values())
    tied = [n for n, v in flat.items() if count[id(v)] > 1]
    if tied:
        raise BatchedUnsupported(
            f"method='batched': params {tied} are one tensor under several names (tied weights), so a use "
            "cannot be told apart by name; use method='ghost'"
        )


def _per_example_losses(loss_fn: Callable, params: dict, batch, B: int) -> Tensor:
    losses = loss_fn(params, batch)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (B,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise BatchedUnsupported(
            f"method='batched' needs loss_fn to return the (B,) = ({B},) per-example losses (a reduction='none' "
            f"loss), got {got}; a mean or sum over the batch hides which example each gradient belongs to"
        )
    return losses


def batched_pass(loss_fn: Callable, params: dict, batch, B: Optional[int] = None):
    """One forward and one backward to the uses' outputs: ``(losses (B,), {name: [factors]},
    {name: (B, *shape) gradient})`` — factors for linear / embedding / conv weights, exact
    per-example gradients for biases and norm affine weights. ``B``: the batch's size when the
    caller knows it."""
    B = batch_size(batch) if B is None else B
    _check_tied(params)
    watched = {n: v for n, v in params.items() if v.is_floating_point()}
    prober = _Prober(B)
    # the watched weights as fresh leaves that require grad: every use's output is in the graph,
    # and the backward below asks for the uses' output gradients only (no weight gradient is formed)
    detached = {n: v.detach().requires_grad_(n in watched) for n, v in params.items()}
    with torch.enable_grad(), Intercept({n: detached[n] for n in watched}, prober,
                                        ops=exact_ops({id(v): n for n, v in detached.items()})):
        losses = _per_example_losses(loss_fn, detached, batch, B)
    if prober.others:
        names = sorted({str(k) for k, _ in prober.others})
        why = "; ".join(sorted({f"{k!r}: {w}" for k, w in prober.others}))
        raise BatchedUnsupported(
            f"method='batched' has no per-example formula for params {names} ({why}); it covers the weights and "
            "biases of F.linear / torch.addmm / F.embedding / F.conv1d / F.conv2d and the affine params of "
            "F.group_norm / F.layer_norm. Use method='ghost' or 'vmap' (exact for any model)"
        )
    return losses.detach(), *_collect(params, prober.records, _output_grads(losses, prober.records), B)


def _output_grads(losses: Tensor, records: list) -> list:
    """∂(Σ_j loss_j)/∂(each use's output), one backward that stops at the uses' outputs (zeros
    for an output the losses do not depend on differentiably)."""
    live = [i for i, (_, _, edge, _) in enumerate(records) if edge is not None]
    got = {}
    if live and losses.requires_grad:
        grads = torch.autograd.grad(losses.sum(), [records[i][2] for i in live], allow_unused=True)
        got = {i: g for i, g in zip(live, grads) if g is not None}
    # (the output's shape, dtype and device, not the output: holding it would keep its memory
    # from being reused during the forward)
    return [got[i] if i in got else torch.zeros(r[3][0], dtype=r[3][1], device=r[3][2]) for i, r in enumerate(records)]


def _collect(params: dict, records: list, g_all, B: int):
    """The per-name factors and small exact gradients of the recorded uses."""
    uses: dict[str, list] = {}
    small: dict[str, Tensor] = {}

    def add(name, value):
        small[name] = value if name not in small else small[name] + value

    for (use, x, _, _), g in zip(records, g_all):
        bias_shape = (B,) + tuple(params[use.bias_key].shape) if use.bias_key is not None else None
        if use.kind in NORM_KINDS:  # a norm's affine weight (and bias); their layout here is (B, 1, ...)
            got = norm_weight_grad(use.kind, x.unsqueeze(1), g.unsqueeze(1), use.options, bias_shape is not None)
            if bias_shape is None:
                add(use.key, got)
            else:
                add(use.key, got[0])
                add(use.bias_key, got[1].reshape(bias_shape))
            continue
        if use.kind == "addmm":  # (B·T, ·) rows, example-major, back to (B, T, ·)
            x, g = x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
        kernel = tuple(use.weight.shape[2:])
        uses.setdefault(use.key, []).append(factors(use.kind, x, g, use.padding_idx, use.options, kernel))
        if bias_shape is not None:
            nd = use.weight.dim() - 2 if use.kind == "conv" else 0
            add(use.bias_key, bias_grad(use.kind, None, g, use.options, nd).reshape(bias_shape))
    return uses, small


def batched_grads(loss_fn: Callable, params: dict, batch, chunk_size: Optional[int], B: Optional[int] = None) -> dict:
    """Full per-example gradients (B, *shape) per name; params no use reached get zeros."""
    B = batch_size(batch) if B is None else B
    chunk = check_chunk(chunk_size, B)
    out = {n: v.new_empty((B,) + tuple(v.shape)) for n, v in params.items()}
    for start, stop in chunks(B, chunk):
        whole = stop - start == B  # one chunk: the batch and the result as they are, no slicing
        part_batch = batch if whole else slice_batch(batch, start, stop)
        _, uses, small = batched_pass(loss_fn, params, part_batch, stop - start)
        for name, dst in out.items():
            part = dst if whole else dst[start:stop]
            if name in uses:
                write_factors(part, uses.pop(name))
                if name in small:
                    part.add_(small[name].to(part.dtype))
            elif name in small:
                part.copy_(small[name])
            else:
                part.zero_()
    return out


def batched_norms_and_sum(loss_fn: Callable, params: dict, batch, max_norm: float, chunk: int, want_sum: bool):
    """(norms (B,), losses (B,), Σ_i clip_C(g_i) or None), chunk by chunk, no G_i formed for
    the factor weights."""
    B = batch_size(batch)
    all_norms, all_losses, total = [], [], None
    for start, stop in chunks(B, chunk):
        loss, uses, small = batched_pass(loss_fn, params, slice_batch(batch, start, stop))
        both = set(uses) & set(small)
        if both:  # a weight with factor uses and norm uses (unusual): form its G_i once
            for name in both:
                G = params[name].new_empty((stop - start,) + tuple(params[name].shape))
                write_factors(G, uses.pop(name))
                small[name] = small[name] + G
        n, part = norms_and_weighted_sum(small, uses, params, stop - start, max_norm, want_sum)
        all_norms.append(n)
        all_losses.append(loss)
        if want_sum:
            total = part if total is None else pytree.tree_map(torch.add, total, part)
    return torch.cat(all_norms), torch.cat(all_losses), total
