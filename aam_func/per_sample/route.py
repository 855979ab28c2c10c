"""The public per-example computations and the choice of route for each (``method``).

- ``"vmap"`` (:mod:`.vmap`): ``vmap(grad)`` over chunks; exact for any loss.
- ``"ghost"`` (:mod:`.ghost`): no per-example gradient of a linear / embedding / conv weight is
  formed.
- ``"batched"`` (:mod:`.batched`): one ordinary batched forward and backward, no vmap, for a
  ``loss_fn`` that returns the (B,) per-example losses of independent examples (the caller's
  word, as Opacus's ``loss_reduction``); about the cost of a training step.
- ``"auto"`` (``grads`` only): ghost for gradients w.r.t. params when some weight is used only
  by ``F.linear`` / ``torch.addmm`` / ``F.embedding`` / ``F.conv1d`` / ``F.conv2d``; else, or if
  the examples run different op sequences, vmap.

``params`` is any pytree (:mod:`.paths`): a nested dict, a ``named_parameters()`` dict, a list,
... ; results come back in its structure. For an ``nn.Module``, write the loss over
``torch.func.functional_call(module, params, args)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..checks import check_choice
from .batched import batched_grads, batched_norms_and_sum
from .batching import batch_size, check_chunk
from .clip import check_max_norm
from .ghost import GhostMismatch, discover, ghost_grads, ghost_norms_and_sum
from .paths import flat_problem
from .vmap import vmap_grads, vmap_losses, vmap_norms_and_sum

__all__ = ["METHODS", "grads", "losses", "norms", "Clipped", "clipped_sum", "check_method"]

METHODS = ("ghost", "vmap", "batched")


_IMPL = {"ghost": ghost_norms_and_sum, "vmap": vmap_norms_and_sum, "batched": batched_norms_and_sum}


def check_method(method: str) -> str:
    return check_choice("method", method, METHODS)


def grads(
    loss_fn: Callable,
    params,
    batch,
    *,
    chunk_size: Optional[int] = None,
    argnums=0,
    method: str = "auto",
):
    """Per-example gradients: leaves shaped (B, *param_shape), written into a preallocated result.

    ``method``:

    - ``"ghost"``: from the ghost pass's factors (one vmapped forward, one backward that stops at
      activations): each linear use writes ``bmm(g_iᵀ, x_i)`` straight into the result, each
      embedding use an index_add of its output gradients' rows; other parameters get exact
      per-example gradients from the same backward. Only one chunk's activations live at once;
      ``chunk_size=None`` picks a chunk that keeps them small next to the result.
    - ``"vmap"``: ``vmap(grad)`` over chunks of ``chunk_size`` (None: the whole batch at once).
    - ``"batched"``: one batched forward and backward (no vmap) for a ``loss_fn`` returning the
      (B,) per-example losses of independent, batch-first examples (:mod:`.batched`); it refuses
      by name any parameter it has no per-example formula for.
    - ``"auto"`` (default): ``"ghost"`` for gradients w.r.t. params (``argnums=0``) when some
      weight is used only by ``F.linear`` / ``F.embedding``; otherwise, or if the examples run
      different op sequences, ``"vmap"``.

    ``argnums`` as in ``torch.func.grad`` over ``(params, batch)``: 0 for params, 1 for the
    example's own tensors (input saliency), (0, 1) for both (these use ``"vmap"``).
    """
    params, loss_fn, restore = flat_problem(loss_fn, params)
    B = batch_size(batch)
    check_choice("method", method, ("auto",) + METHODS)
    check_chunk(chunk_size, B)
    if B == 0:
        raise ValueError("batch is empty (batch size 0); there are no per-example gradients to compute")
    if method in ("ghost", "batched") and argnums != 0:
        raise ValueError(f"method={method!r} computes gradients w.r.t. params only (argnums=0); use method='vmap'")
    if method == "batched":
        return restore(batched_grads(loss_fn, params, batch, chunk_size, B))
    if method != "vmap" and argnums == 0:
        d = discover(loss_fn, params, batch)
        if method == "ghost" or d.ghost:
            try:
                return restore(ghost_grads(loss_fn, params, batch, chunk_size, d))
            except GhostMismatch:
                if method == "ghost":
                    raise
    out = vmap_grads(loss_fn, params, batch, chunk_size, argnums)
    if argnums == 0:
        return restore(out)
    return tuple(restore(o) if a == 0 else o for a, o in zip(argnums, out)) if isinstance(argnums, tuple) else out


def losses(loss_fn: Callable, params, batch, *, chunk_size: Optional[int] = None) -> Tensor:
    """(B,) per-example losses ``loss_fn(params, batch[i:i+1])`` (a vmapped forward)."""
    params, loss_fn, _ = flat_problem(loss_fn, params)
    B = batch_size(batch)
    return vmap_losses(loss_fn, params, batch, check_chunk(chunk_size, B))


def norms(loss_fn: Callable, params, batch, *, chunk_size: Optional[int] = None, method: str = "ghost") -> Tensor:
    """(B,) per-example global L2 gradient norms ‖∇ loss_i‖, without keeping all per-example
    gradients (``"vmap"``: one chunk at a time; ``"ghost"``: none for linear/embedding weights)."""
    params, loss_fn, _ = flat_problem(loss_fn, params)
    B = batch_size(batch)
    chunk = check_chunk(chunk_size, B)
    check_method(method)
    if B == 0:
        return torch.zeros(0)
    return _IMPL[method](loss_fn, params, batch, float("inf"), chunk, False)[0]


class Clipped(NamedTuple):
    """``sum``: Σ_i min(1, C/‖g_i‖) g_i (the params' structure); ``norms``: (B,) ‖g_i‖ before clipping;
    ``losses``: (B,) per-example losses."""

    sum: object  # the params' structure
    norms: Tensor
    losses: Tensor


def clipped_sum(
    loss_fn: Callable,
    params,
    batch,
    max_norm: float,
    *,
    chunk_size: Optional[int] = None,
    method: str = "ghost",
) -> Clipped:
    """The DP-SGD aggregate Σ_i clip_C(g_i), clip_C(g) = g · min(1, C/(‖g‖ + 1e-6)).

    An empty batch gives a zero sum (a Poisson-sampled batch may be empty).
    """
    params, loss_fn, restore = flat_problem(loss_fn, params)
    max_norm = check_max_norm(max_norm)
    B = batch_size(batch)
    chunk = check_chunk(chunk_size, B)
    check_method(method)
    if B == 0:
        return Clipped(restore({n: torch.zeros_like(v) for n, v in params.items()}), torch.zeros(0), torch.zeros(0))
    n, l, total = _IMPL[method](loss_fn, params, batch, max_norm, chunk, True)
    return Clipped(restore(total), n, l)
