"""Curvature and data attribution from per-example gradients: hvp, gradient inner products, TracIn.
Derivation and tests: ``proofs/per_sample.md`` §4."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor
from torch.func import grad, jvp

from .. import tree
from ..tree import Params
from .batching import batch_size, check_chunk, chunks, slice_batch
from .route import grads

__all__ = ["hvp", "grad_dots", "tracin"]


def hvp(loss_fn: Callable, params: Params, batch, vector: Params) -> Params:
    """Hessian-vector product H v of ``loss_fn(·, batch)`` at ``params``, forward-over-reverse:
    ``jvp(grad(loss))`` costs about two gradients and never forms H."""
    tree.check_structure(params, vector, what="hvp vector")
    return jvp(lambda p: grad(loss_fn)(p, batch), (params,), (vector,))[1]


def _flat_grads(g: Params) -> Tensor:
    return torch.cat([x.reshape(x.shape[0], -1) for x in tree.leaves(g)], dim=1)


def grad_dots(
    loss_fn: Callable, params: Params, batch_a, batch_b=None, *, chunk_size: Optional[int] = None
) -> Tensor:
    """(Na, Nb) matrix ⟨∇loss(a_i), ∇loss(b_j)⟩ of per-example gradient inner products
    (``batch_b=None``: a against itself). ``batch_b``'s gradients are held flat (Nb, P); ``a`` is
    processed ``chunk_size`` examples at a time."""
    Na = batch_size(batch_a)
    chunk = check_chunk(chunk_size, Na)
    if batch_b is None:
        gb = _flat_grads(grads(loss_fn, params, batch_a, chunk_size=chunk_size))
        return gb @ gb.t()
    gb = _flat_grads(grads(loss_fn, params, batch_b, chunk_size=chunk_size))
    rows = [_flat_grads(grads(loss_fn, params, slice_batch(batch_a, s, e))) @ gb.t() for s, e in chunks(Na, chunk)]
    return torch.cat(rows)


def tracin(
    loss_fn: Callable, checkpoints, train_batch, test_batch, *, chunk_size: Optional[int] = None
) -> Tensor:
    """TracIn-CP (Pruthi et al. 2020): influence of each training example on each test example,
    Σ_c η_c ⟨∇loss(train_i; θ_c), ∇loss(test_j; θ_c)⟩ over checkpoints ``[(params_c, η_c), ...]``.
    Returns (N_train, N_test)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("tracin needs at least one (params, learning_rate) checkpoint")
    total = None
    for params, lr in checkpoints:
        part = lr * grad_dots(loss_fn, params, train_batch, test_batch, chunk_size=chunk_size)
        total = part if total is None else total + part
    return total
