"""Every ``F.embedding`` call during per-example work, made exact under vmap (both routes).

``ExactLookups`` is a ``TorchFunctionMode`` entered around each per-example pass (the ghost
route's discovery and pass, the vmap route's chunks). It sees *every* table lookup, whatever the
table (a parameter, or a table computed from parameters or from the example), and:

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
  i alone" is not defined by the loss. Renormalise once before the step and look up without it.
- ``scale_grad_by_freq``: passed through (the exact route's batched backward counts each
  example's own ids; checked against the loop).

Proof note and tests: ``proofs/per_sample.md`` §2 (tests/test_ghost_lookups.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ExactLookups", "exact_lookups"]

_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


class ExactLookups(TorchFunctionMode):
    """See the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.embedding or len(args) > len(_ARGS):
            return func(*args, **kwargs)
        bound = dict(zip(_ARGS, args), **kwargs)
        if bound.get("max_norm") is not None:
            raise ValueError(
                f"F.embedding(max_norm={bound['max_norm']!r}) renormalises the table in place during the forward; "
                "per-example gradients are not defined for it (each example's renormalisation changes the table the "
                "next reads). Renormalise the table once before the step (torch.embedding_renorm_ under "
                "torch.no_grad()) and look up with max_norm=None"
            )
        padding_idx = bound.pop("padding_idx", None)
        bound["sparse"] = False
        out = func(**bound)
        if padding_idx is None:
            return out
        ids = bound["input"]
        if padding_idx < 0:
            padding_idx += bound["weight"].shape[0]
        return torch.where((ids == padding_idx).unsqueeze(-1), out.detach(), out)


def exact_lookups(fn):
    """``fn`` run inside :class:`ExactLookups`."""

    def wrapped(*args, **kwargs):
        with ExactLookups():
            return fn(*args, **kwargs)

    return wrapped
