"""TRAK-style attribution (Park et al. 2023) on projected per-example gradients that are never
formed: for a weight whose per-example gradient is G_i = Σ_t L_it R_itᵀ (the ghost factors,
``per_sample.factors``), a Kronecker-structured Gaussian projection P = P_L ⊗ P_R gives

    P vec(G_i) = vec(P_L G_i P_Rᵀ) = vec(Σ_t (P_L L_it)(P_R R_it)ᵀ)

so only the projected factors (k_L + k_R numbers per row) are made (the LoGra construction,
Choe et al. 2024); an embedding's one-hot L projects by gathering P_L's columns. The other
parameters' (exact) per-example gradients are projected by a dense Gaussian. Then

    φ_i = P g_i / √k,   scores = Φ_train (Φ_trainᵀ Φ_train + λI)⁻¹ Φ_queryᵀ      (N_train, N_query)

(TRAK's kernel with the identity residual weights, one model). Derivation: proofs/curvature.md §7.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_int, check_number
from ..per_sample.batching import batch_size, check_chunk, chunks, slice_batch
from ..per_sample.factors import matrix_shape
from ..per_sample.ghost import discover, ghost_pass
from ..per_sample.paths import flat_problem

__all__ = ["project", "trak_scores"]


def _gauss(shape, seed: int, dtype, device) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


def _project_chunk(loss_fn, params, batch, d, side: int, small_dim: int, seed: int) -> Tensor:
    _, small_grads, uses = ghost_pass(loss_fn, params, batch, d)
    parts = []
    for i, name in enumerate(sorted(uses)):
        out_dim, in_dim = matrix_shape(params[name].shape)
        PL = _gauss((side, out_dim), seed + 2 * i, torch.float32, params[name].device)
        PR = _gauss((side, in_dim), seed + 2 * i + 1, torch.float32, params[name].device)
        acc = 0
        for L, ids, R in uses[name]:
            pl = PL.t()[L] if ids else L.float() @ PL.t()  # (b, N, side)
            acc = acc + pl.transpose(1, 2) @ (R.float() @ PR.t())  # (b, side, side)
        parts.append(acc.reshape(acc.shape[0], -1))
    if small_grads:
        flat_small = torch.cat([g.reshape(g.shape[0], -1).float() for _, g in sorted(small_grads.items())], 1)
        P = _gauss((flat_small.shape[1], small_dim), seed - 1, torch.float32, flat_small.device)
        parts.append(flat_small @ P)
    phi = torch.cat(parts, 1)
    return phi / phi.shape[1] ** 0.5


def project(loss_fn: Callable, params, batch, *, side: int = 16, small_dim: int = 256, seed: int = 0,
            chunk_size: Optional[int] = None) -> Tensor:
    """(B, k) projected per-example gradients: side² features per factored weight, ``small_dim``
    for all other parameters together; the same ``seed`` gives the same projection."""
    check_int("side", side, min=1)
    check_int("small_dim", small_dim, min=1)
    params, loss_fn, _ = flat_problem(loss_fn, params)
    B = batch_size(batch)
    d = discover(loss_fn, params, batch)
    return torch.cat([_project_chunk(loss_fn, params, slice_batch(batch, s, e), d, side, small_dim, seed)
                      for s, e in chunks(B, check_chunk(chunk_size, B))])


def trak_scores(loss_fn: Callable, params, train_batch, query_batch, *, damping: float = 1e-3, side: int = 16,
                small_dim: int = 256, seed: int = 0, chunk_size: Optional[int] = None) -> Tensor:
    """(N_train, N_query) TRAK scores from :func:`project`'s features; see the module doc."""
    check_number("damping", damping, min=0, min_open=True)
    kw = dict(side=side, small_dim=small_dim, seed=seed, chunk_size=chunk_size)
    phi = project(loss_fn, params, train_batch, **kw).double()
    phq = project(loss_fn, params, query_batch, **kw).double()
    K = phi.t() @ phi + damping * torch.eye(phi.shape[1], dtype=phi.dtype)
    return (phi @ torch.linalg.solve(K, phq.t())).float()
