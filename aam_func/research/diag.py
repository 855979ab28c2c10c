"""The exact diagonal of the GGN, per example or summed, through per-example gradients of
surrogate losses: no matrix and no per-parameter probing.

With S_k (k = 1..C) the columns of c·H_f's square root (``Problem.output_sqrt``) and J_n example
n's Jacobian, example n's GGN is Σ_{r,k} J_nᵀ s_{n,r,k} s_{n,r,k}ᵀ J_n over its rows r, so its
diagonal is Σ_{r,k} (J_nᵀ s_{n,r,k})²: the squared per-example gradients of the surrogate
⟨f_n, s_{n,r,k}⟩ (BackPACK's DiagGGNExact backpropagates the same columns; Dangel et al. 2020).
Each surrogate's per-example gradients come from ``per_sample.grads`` (``method="ghost"`` by
default: a linear, conv or embedding weight's come from its factors, x and g, written in place,
never a vmapped weight gradient). Cost: C·R per-example gradient passes (R rows per example);
the Hutchinson estimate (``spectral.hutchinson_diag``) is cheaper when C·R is large.
Derivation and BackPACK parity: ``proofs/curvature.md`` §5, ``tests/test_research_diag.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils._pytree as pytree

from ..checks import check_bool
from ..per_sample import grads as per_example_grads
from ..per_sample.batching import batch_size, check_chunk, chunks, slice_batch
from .problem import Problem

__all__ = ["diag_ggn"]


def _chunk_diag(problem: Problem, params, x, y, c: float, method: str):
    out = problem.apply(params, x).detach()
    problem.check(out, y)
    S = problem.output_sqrt(out, y, c)  # (C, B, *rows, C)
    B, rows = out.shape[0], math.prod(out.shape[1:-1])
    S = S.reshape(S.shape[0], B, rows, out.shape[-1])
    total = None

    def surrogate(p, batch):
        xb, s = batch
        return (problem.apply(p, xb).reshape(s.shape) * s).sum()

    for k in range(S.shape[0]):
        for r in range(rows):
            s = torch.zeros_like(S[k])
            s[:, r] = S[k][:, r]
            if not bool(s.any()):
                continue
            g = per_example_grads(surrogate, params, (x, s), method=method)
            sq = pytree.tree_map(lambda t: t.pow(2), g)
            total = sq if total is None else pytree.tree_map(torch.add, total, sq)
    if total is None:  # every row ignored: zeros
        total = pytree.tree_map(lambda t: t.new_zeros((B,) + tuple(t.shape)), params)
    return total


def diag_ggn(problem: Problem, params, inputs, targets, *, per_example: bool = False,
             chunk_size: Optional[int] = None, method: str = "auto"):
    """diag(c Σ_n J_nᵀ H_n J_n) shaped like ``params``, or with ``per_example`` each example's
    term (leaves (B, ...)); ``method``: ``per_sample.grads``'s route ("ghost" or "vmap")."""
    check_bool("per_example", per_example)
    B = batch_size(inputs)
    c = problem.scale(targets)
    parts = []
    for s, e in chunks(B, check_chunk(chunk_size, B)):
        d = _chunk_diag(problem, params, slice_batch(inputs, s, e), targets[s:e], c, method)
        parts.append(d if per_example else pytree.tree_map(lambda t: t.sum(0), d))
    if per_example:
        return pytree.tree_map(lambda *ts: torch.cat(ts), *parts)
    return pytree.tree_map(lambda *ts: sum(ts), *parts)
