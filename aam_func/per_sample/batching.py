"""Batches for per-example work: the shared batch dimension, slices, chunks and vmap's in_dims.

A batch is a tensor, or a dict / tuple / list of them (non-tensor leaves pass through
unchanged), whose tensors share a leading batch dimension. "Per example" means the loss on that
example alone, as a batch of one: ``loss_i = loss_fn(params, batch[i:i+1])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch.utils._pytree as pytree
from torch import Tensor

from ..checks import check_int

__all__ = ["RANDOMNESS", "batch_size", "map_batch", "slice_batch", "in_dims", "per_example", "check_chunk", "chunks"]

# Each example draws its own random numbers (dropout) from the global RNG, as a loop would.
RANDOMNESS = "different"


def batch_size(batch) -> int:
    """The shared leading dimension of the batch's tensors; a clear error when there is none."""
    leaves, _ = pytree.tree_flatten(batch)
    tensors = [(i, x) for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    if not tensors:
        raise ValueError(f"batch holds no tensors (got {type(batch).__name__}); per-example work needs a batch dimension")
    sizes: dict[int, list] = {}
    for i, x in tensors:
        if x.dim() == 0:
            raise ValueError(
                f"batch tensor #{i} is 0-d (a scalar); every batch tensor needs a leading batch dimension"
            )
        sizes.setdefault(int(x.shape[0]), []).append((i, tuple(x.shape)))
    if len(sizes) > 1:
        desc = "; ".join(f"size {b}: tensors {[s for _, s in v]}" for b, v in sizes.items())
        raise ValueError(f"batch tensors disagree on the batch size (leading dimension): {desc}")
    return next(iter(sizes))


def map_batch(fn: Callable[[Tensor], Any], batch):
    """``fn`` on every tensor of the batch; other leaves unchanged."""
    leaves, spec = pytree.tree_flatten(batch)
    return pytree.tree_unflatten([fn(x) if isinstance(x, Tensor) else x for x in leaves], spec)


def slice_batch(batch, start: int, stop: int):
    """Examples ``start:stop`` of the batch."""
    return map_batch(lambda x: x[start:stop], batch)


def in_dims(batch):
    """vmap's ``in_dims`` for the batch: 0 for tensors, None for the other leaves."""
    leaves, spec = pytree.tree_flatten(batch)
    return pytree.tree_unflatten([0 if isinstance(x, Tensor) else None for x in leaves], spec)


def per_example(loss_fn: Callable) -> Callable:
    """``loss_fn`` on one example (vmap strips the batch dim; we put a batch of one back). A
    loss that returns per-example losses (shape (1,) on a batch of one, as ``method="batched"``
    wants) gives its one value as a scalar, so one ``loss_fn`` serves every route. Any other shape
    is refused by name: a per-example loss is one number."""

    def one(params, example):
        loss = loss_fn(params, map_batch(lambda x: x.unsqueeze(0), example))
        if not isinstance(loss, Tensor) or loss.dim() == 0:
            return loss
        if tuple(loss.shape) != (1,):
            raise ValueError(f"loss_fn must return one loss per example: a scalar, or shape (1,) on a batch of "
                             f"one example; got shape {tuple(loss.shape)}")
        return loss.reshape(())

    return one


def check_chunk(chunk_size: Optional[int], B: int) -> int:
    """Examples per chunk: ``chunk_size``, or the whole batch (at least 1) when None."""
    chunk = check_int("chunk_size", chunk_size, min=1, allow_none=True)
    return max(B, 1) if chunk is None else chunk


def chunks(B: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of ``chunk`` examples covering 0..B."""
    for start in range(0, B, chunk):
        yield start, min(B, start + chunk)
