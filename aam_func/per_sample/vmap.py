"""The exact route: ``vmap(grad)`` over chunks of examples (``method="vmap"``).

Only one chunk of per-example gradients exists at a time; ``grads`` copies each chunk into a
preallocated (B, ...) result. Derivation: ``proofs/per_sample.md`` §1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from .batching import RANDOMNESS, batch_size, check_chunk, chunks, in_dims, per_example, slice_batch
from .clip import clip_factors, global_norms, weighted_sum
from .exact_ops import explained, in_exact_ops

__all__ = ["vmap_grads", "vmap_losses", "vmap_norms_and_sum"]


@explained
def vmap_grads(loss_fn: Callable, params, batch, chunk_size, argnums):
    """Per-example gradients w.r.t. ``argnums`` of ``(params, example)``, chunk by chunk."""
    B = batch_size(batch)
    chunk = check_chunk(chunk_size, B)
    per = vmap(grad(in_exact_ops(per_example(loss_fn)), argnums=argnums), in_dims=(None, in_dims(batch)), randomness=RANDOMNESS)
    if chunk >= B:
        return per(params, batch)
    out_leaves, out_spec = None, None
    for start, stop in chunks(B, chunk):
        part, spec = pytree.tree_flatten(per(params, slice_batch(batch, start, stop)))
        if out_leaves is None:
            out_spec = spec
            out_leaves = [x.new_empty((B,) + tuple(x.shape[1:])) for x in part]
        for dst, src in zip(out_leaves, part):
            dst[start:stop].copy_(src)
        del part
    return pytree.tree_unflatten(out_leaves, out_spec)


@explained
def vmap_losses(loss_fn: Callable, params, batch, chunk: int) -> Tensor:
    """(B,) per-example losses by a vmapped forward, chunk by chunk."""
    B = batch_size(batch)
    if B == 0:
        return torch.zeros(0)
    per = vmap(in_exact_ops(per_example(loss_fn)), in_dims=(None, in_dims(batch)), randomness=RANDOMNESS)
    return torch.cat([per(params, slice_batch(batch, a, b)) for a, b in chunks(B, chunk)])


@explained
def vmap_norms_and_sum(loss_fn: Callable, params, batch, max_norm: float, chunk: int, want_sum: bool):
    """(norms (B,), losses (B,), Σ_i clip_C(g_i) or None) from each chunk's full per-example grads."""
    B = batch_size(batch)
    per = vmap(grad_and_value(in_exact_ops(per_example(loss_fn))), in_dims=(None, in_dims(batch)), randomness=RANDOMNESS)
    all_norms, all_losses, total = [], [], None
    for start, stop in chunks(B, chunk):
        g, loss = per(params, slice_batch(batch, start, stop))
        n = global_norms(g)
        all_norms.append(n)
        all_losses.append(loss.detach())
        if want_sum:
            part = weighted_sum(clip_factors(n, max_norm), g)
            total = part if total is None else pytree.tree_map(torch.add, total, part)
        del g
    return torch.cat(all_norms), torch.cat(all_losses), total
