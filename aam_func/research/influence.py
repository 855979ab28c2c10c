"""Influence of training examples on query losses: scores[i, j] = ⟨∇ℓ(train_i), (C + λI)⁻¹ ∇ℓ(query_j)⟩
(Koh & Liang 2017), with the inverse-curvature product by conjugate gradients, LiSSA (Agarwal et
al. 2017) or EK-FAC (Grosse et al. 2023), and TRAK-style random projections (Park et al. 2023).

    ihvp = cg_ihvp(lambda v: ggn_vp(problem, params, x, y, v), damping=1e-3)
    S = scores(loss_fn, params, train_batch, query_batch, ihvp, chunk_size=256)   # (N_train, N_query)

``loss_fn(params, batch)`` is the training loss on a batch; "per example" is a batch of one
(``per_sample``'s convention). Query gradients are formed once and their inverse-curvature
products held (Q of them, each the size of the params); training gradients come chunk by chunk
from ``per_sample.grads`` (ghost route by default), so thousands of training examples never sit
in memory at once. ``tracin`` (gradient dots over checkpoints) is ``per_sample.tracin``.
Derivations: ``proofs/curvature.md`` §6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .. import tree
from ..checks import check_int, check_number
from ..per_sample import grads as per_example_grads
from ..per_sample.batching import batch_size, check_chunk, chunks, slice_batch
from ..per_sample.attribution import tracin  # noqa: F401  (re-exported: one owner, per_sample)
from .kfac import Factors, inverse_product
from .spectral import Flat, cg

__all__ = ["scores", "cg_ihvp", "lissa_ihvp", "ekfac_ihvp", "tracin"]


def cg_ihvp(mv: Callable, *, damping: float, iterations: int = 100, tol: float = 1e-8) -> Callable:
    """b ↦ (A + λI)⁻¹ b by conjugate gradients on the product ``mv`` (a GGN or Fisher: PSD)."""
    check_number("damping", damping, min=0, min_open=True)
    return lambda b: cg(mv, b, damping=damping, iterations=iterations, tol=tol)


def lissa_ihvp(mv: Callable, *, damping: float, scale: float, depth: int = 200) -> Callable:
    """b ↦ (A + λI)⁻¹ b by LiSSA's Neumann recursion h ← b + (I - (A + λI)/s) h, result h / s;
    converges when ``scale`` s exceeds the largest eigenvalue of A + λI (estimate it with
    ``spectral.lanczos``); ``depth`` terms."""
    check_number("damping", damping, min=0, min_open=True)
    check_number("scale", scale, min=0, min_open=True)
    check_int("depth", depth, min=1)

    def solve(b):
        flat = Flat(b)
        op = flat.operator(mv)
        bv = flat.vec(b)
        h = bv.clone()
        for _ in range(depth):
            h = bv + h - (op(h) + damping * h) / scale
        return flat.tree(h / scale)

    return solve


def ekfac_ihvp(factors: Factors, *, damping: float) -> Callable:
    """b ↦ (F_EKFAC + λI)⁻¹ b on the factored weights (and their biases); every other leaf gets
    zero, so the scores cover the factored weights only (kronfluence's convention)."""
    check_number("damping", damping, min=0, min_open=True)
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be kfac.collect(...)'s Factors, got {type(factors).__name__}")

    def solve(b):
        flat = tree.flatten(b)
        pre = inverse_product(factors, flat, damping=damping)
        return tree.unflatten_like(b, {n: pre.get(n, torch.zeros_like(g)) for n, g in flat.items()})

    return solve


def _flat_per_example(g) -> Tensor:
    return torch.cat([x.reshape(x.shape[0], -1) for x in tree.leaves(g)], dim=1)


def scores(loss_fn: Callable, params, train_batch, query_batch, ihvp: Optional[Callable], *,
           chunk_size: Optional[int] = None, method: str = "auto") -> Tensor:
    """(N_train, N_query) influence scores ⟨g_train_i, ihvp(g_query_j)⟩; ``ihvp=None``: plain
    gradient inner products (TracIn at one checkpoint with unit step)."""
    Q = batch_size(query_batch)
    N = batch_size(train_batch)
    qg = per_example_grads(loss_fn, params, query_batch, method=method)
    rows = []
    for j in range(Q):
        one = tree.map(lambda t: t[j], qg)
        rows.append(Flat(params).vec(ihvp(one) if ihvp is not None else one))
    K = torch.stack(rows, 1)  # (P, Q)
    out = []
    for s, e in chunks(N, check_chunk(chunk_size, N)):
        g = per_example_grads(loss_fn, params, slice_batch(train_batch, s, e), method=method)
        out.append(_flat_per_example(g).to(K.dtype) @ K)
    return torch.cat(out)
