"""Per-example gradients, their norms, the DP-SGD clipped sum, and attribution helpers.

``loss_fn(params, batch) -> scalar`` is the ordinary training loss on a batch whose tensors share
a leading batch dimension (a tensor, or a dict / tuple / list of them; non-tensor leaves are
passed through unchanged). "Per example" means ``loss_fn`` evaluated on that example alone, as a
batch of one: ``loss_i = loss_fn(params, batch[i:i+1])``.

    g = per_sample.grads(loss, params, batch)                   # Params, leaves (B, *shape)
    n = per_sample.norms(loss, params, batch)                   # (B,) global L2 norms
    c = per_sample.clipped_sum(loss, params, batch, max_norm=1.0)   # Σ_i min(1, C/‖g_i‖) g_i

Three routes compute norms, clipped sums and (``grads``) full per-example gradients:

- ``"vmap"`` (:mod:`.vmap`): ``vmap(grad)`` over chunks of ``chunk_size`` examples; only one
  chunk of per-example gradients exists at a time.
- ``"ghost"`` (:mod:`.ghost`, the default): no per-example gradient of a linear, embedding or
  conv weight is ever formed; each use of such a weight leaves factors (inputs x or a conv's
  input patches, output gradients g) from which norms, clipped sums and per-example gradients
  follow (:mod:`.factors`). The uses are found by :class:`aam_func.intercept.Intercept`
  (``F.linear``, ``torch.addmm``, ``F.embedding``, ``F.conv1d`` / ``F.conv2d`` with groups 1, by
  weight identity); a weight used any other way takes the exact route inside the same pass.
- ``"batched"`` (:mod:`.batched`, opt-in): for a ``loss_fn`` that returns the (B,) per-example
  losses of independent, batch-first examples (the caller's word, as Opacus's
  ``loss_reduction``), one ordinary batched forward and backward with no vmap — about the cost
  of a training step; a parameter it has no formula for is refused by name
  (:class:`BatchedUnsupported`). A loss written that way serves the other routes too.

``params`` is any pytree (a nested dict, an ``nn.Module``'s ``named_parameters()`` dict, a list,
...); results come back in its structure. A module is used through
``torch.func.functional_call(module, params, args)`` inside ``loss_fn``; a BatchNorm in training
mode (it mixes the examples) is refused by name (:mod:`.exact_ops`).

The rest: :mod:`.batching` (batch size, slices, chunks), :mod:`.exact_ops` (lookups made exact and
batch-mixing layers refused, both routes), :mod:`.paths` (params as any pytree), :mod:`.clip` (norms, clip factors),
:mod:`.route` (the public functions and the choice of route), :mod:`.dp` (DP-SGD),
:mod:`.attribution` (hvp, gradient inner products, TracIn). Derivations and the tests that check
them: ``proofs/per_sample.md`` and ``proofs/ghost_modules.md``.
"""

from . import attribution, batched, batching, clip, dp, exact_ops, factors, ghost, paths, route, vmap
from .attribution import grad_dots, hvp, tracin
from .batched import BatchedUnsupported
from .batching import batch_size
from .clip import CLIP_EPS, clip_factors, global_norms
from .dp import DPInfo, dp_aggregate, dp_sgd, poisson_sample
from .route import METHODS, Clipped, clipped_sum, grads, losses, norms

__all__ = [
    "batch_size",
    "grads",
    "norms",
    "clipped_sum",
    "Clipped",
    "losses",
    "hvp",
    "grad_dots",
    "tracin",
    "global_norms",
    "clip_factors",
    "dp_aggregate",
    "dp_sgd",
    "DPInfo",
    "poisson_sample",
    "METHODS",
    "BatchedUnsupported",
    "CLIP_EPS",
]
