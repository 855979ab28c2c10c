"""The ops of a per-example pass made exact under vmap, or refused by name (both routes).

:func:`exact_ops` gives the replacements that :class:`aam_func.intercept.Intercept` (``ops=``)
applies to *every* call of two functions inside each per-example pass (the ghost route's
discovery and pass, the vmap route's chunks), whatever the tensors (a parameter, or a table
computed from parameters or from the example):

``F.embedding``
  - ``padding_idx=p``: looks up without it and detaches the positions that read row p. Same
    values, and row p receives no gradient, as the option promises. functorch's backward of an
    embedding whose table is *batched* (a table computed from the per-example expanded
    parameters of the ghost pass, or from the example) keeps the padding row's gradient of one
    example only and gives the others row p's gradient: silently wrong norms (issue 15).
  - ``sparse=True``: looks up densely. The option only changes the layout of the table's
    gradient, not its values; per-example gradients are dense (B, V, d) tensors either way, and
    vmap has no batching rule for the sparse one.
  - ``max_norm``: refused (``ValueError``). The lookup renormalises the table's rows *in place*,
    outside autograd: a side effect on the caller's params, and in a loop over examples each
    example's renormalisation changes the table the next one reads, so "the gradient of example
    i alone" is not defined by the loss. Renormalise once before the step instead.
  - ``scale_grad_by_freq``: passed through (the batched backward counts each example's own ids).

``F.batch_norm`` in training mode (a BatchNorm layer in ``train()``)
  refused (``ValueError``) with the layer's name (found from its affine weight among the params)
  and the fix, as Opacus's validator does: it normalises with statistics of the whole batch, so
  example i's loss depends on the other examples and per-example gradients (hence DP-SGD's
  clipping) are not those of the batch's loss. ``nn.GroupNorm`` / ``nn.LayerNorm`` normalise each
  example alone. In eval mode (running statistics) it is a per-channel affine map: allowed.

Proof note and tests: ``proofs/per_sample.md`` §2 (``tests/test_ghost_lookups.py``) and
``proofs/ghost_modules.md`` (``tests/test_ghost_modules.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import tree
from ..intercept import Client, Intercept

__all__ = ["exact_ops", "in_exact_ops", "explained", "batch_norm_error", "param_names"]


def batch_norm_error(name: Optional[str], kind: str = "BatchNorm") -> ValueError:
    """The refusal of a batch-mixing normalisation, naming the layer and the fix."""
    where = f"{kind} layer {name!r}" if name else f"a {kind} layer (F.batch_norm in training mode)"
    return ValueError(
        f"per-example gradients: {where} normalises with the statistics of the whole batch, so each example's "
        "loss depends on the others and its gradient is not a per-example gradient (DP-SGD's clipping would "
        "not bound an example's influence). Replace it with nn.GroupNorm(num_groups, num_channels) (or "
        "nn.LayerNorm), which normalises each example alone, or put the layer in eval mode"
    )


def _lookup(func, bound: dict) -> Tensor:
    if bound.get("max_norm") is not None:
        raise ValueError(
            f"F.embedding(max_norm={bound['max_norm']!r}) renormalises the table in place during the forward; "
            "per-example gradients are not defined for it (each example's renormalisation changes the table the "
            "next reads). Renormalise the table once before the step (torch.embedding_renorm_ under "
            "torch.no_grad()) and look up with max_norm=None"
        )
    bound = dict(bound)
    padding_idx = bound.pop("padding_idx", None)
    bound["sparse"] = False
    out = func(**bound)
    if padding_idx is None:
        return out
    if padding_idx < 0:
        padding_idx += bound["weight"].shape[0]
    return torch.where((bound["input"] == padding_idx).unsqueeze(-1), out.detach(), out)


def exact_ops(names: Optional[Mapping[int, str]] = None) -> dict:
    """The ``Intercept(ops=...)`` replacements; ``names`` maps ``id(tensor)`` to the dotted name
    of each param the pass was given (to name a refused layer)."""
    names = dict(names or {})

    def batch_norm(func, bound: dict) -> Tensor:
        if bound.get("training", False):
            name = names.get(id(bound.get("weight")))
            raise batch_norm_error(name.rsplit(".", 1)[0] if name and "." in name else name)
        return func(**bound)

    return {F.embedding: _lookup, F.batch_norm: batch_norm}


def param_names(params) -> dict[int, str]:
    """``id(leaf) -> dotted name`` for the tensor leaves of a params pytree."""
    names, leaves, _ = tree.paths(params)
    return {id(v): n for n, v in zip(names, leaves) if isinstance(v, Tensor)}


def in_exact_ops(fn):
    """``fn(params, ...)`` run with :func:`exact_ops` in force (the params' names known to it)."""

    def wrapped(params, *args, **kwargs):
        with Intercept({}, Client(), ops=exact_ops(param_names(params))):
            return fn(params, *args, **kwargs)

    return wrapped


def explained(fn):
    """``fn(loss_fn, params, batch, ...)`` whose transform errors are explained where possible: on a
    ``RuntimeError`` (an in-place buffer update under vmap, a BatchNorm's counter, comes before its
    ``F.batch_norm``), the loss runs once on the first example with :func:`exact_ops` in force and
    no transform; a refusal found there (the layer named) is raised from the original error."""

    def wrapped(loss_fn, params, batch, *args, **kwargs):
        try:
            return fn(loss_fn, params, batch, *args, **kwargs)
        except RuntimeError as err:
            from .batching import slice_batch

            try:
                with torch.no_grad():
                    in_exact_ops(loss_fn)(params, slice_batch(batch, 0, 1))
            except ValueError as refusal:
                raise refusal from err
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise

    return wrapped
