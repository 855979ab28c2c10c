"""Matrix-free curvature products over a batch: Hessian, generalised Gauss-Newton and Fisher
(true, sampled-label, empirical), summed over the batch or per example, chunked.

    problem = Problem(apply, loss="cross_entropy")
    Gv = ggn_vp(problem, params, inputs, targets, v)              # Params shaped like params
    Fv = fisher_vp(problem, params, inputs, targets, v, kind="mc", samples=4, generator=g)
    Gv_i = ggn_vp(problem, params, inputs, targets, v, per_example=True)   # leaves (B, ...)

With J the Jacobian of the outputs f = apply(params, inputs) and c the problem's scale:

- ``hessian_vp``: ∇²L v, forward-over-reverse (``per_sample.hvp``);
- ``ggn_vp``: c Jᵀ H_f J v: one jvp gives J v, the closed-form output Hessian multiplies it, one
  vjp maps it back (never a matrix);
- ``fisher_vp(kind="true")``: the expected outer product of the per-row scores under the
  model's own likelihood; for cross-entropy and mse that expectation *is* H_f, so it equals the
  GGN (proofs/curvature.md §2) and is computed by the same code;
- ``fisher_vp(kind="mc")``: labels drawn from the model, c Σ_rows Jᵀ r rᵀ J v averaged over
  ``samples`` draws (r = ∇_f ℓ at the drawn label), one jvp and one vjp per chunk;
- ``fisher_vp(kind="empirical")``: c Σ_n g_n g_nᵀ v with g_n = Jᵀ r the gradient of example n's
  loss at its true targets (summed over its rows).

``per_example=True``: example n's own term of the sum (its rows, the batch's scale), by vmap
over examples; the sum over n is the batch product. ``chunk_size`` bounds the examples one
pass holds. Dense checks: ``tests/test_research_curvature.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .. import tree
from ..checks import check_choice, check_int
from ..per_sample.attribution import hvp as _hvp
from ..per_sample.batching import RANDOMNESS, batch_size, check_chunk, chunks, in_dims, map_batch, slice_batch
from ..per_sample.exact_ops import in_exact_ops
from .problem import Problem

__all__ = ["hessian_vp", "ggn_vp", "fisher_vp", "FISHER_KINDS", "tree_add", "tree_scale", "tree_dot", "batch_sum"]

FISHER_KINDS = ("true", "mc", "empirical")


def tree_add(a, b):
    return pytree.tree_map(torch.add, a, b)


def tree_scale(a, s):
    return pytree.tree_map(lambda x: x * s, a)


def tree_dot(a, b) -> Tensor:
    """Σ over leaves of ⟨a, b⟩."""
    return sum((x * y).sum() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def _check(problem: Problem, params, inputs, targets, vector) -> int:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an aam_func.research.Problem, got {type(problem).__name__}")
    if vector is not None:
        tree.check_structure(params, vector, what="vector")
    B = batch_size(inputs)
    if not isinstance(targets, Tensor) or targets.dim() == 0 or targets.shape[0] != B:
        raise ValueError(f"targets must be a tensor with the inputs' batch size {B} as its leading dimension, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return B


def _one(example):
    """vmap strips the batch dim; put a batch of one back."""
    return map_batch(lambda t: t.unsqueeze(0), example)


def batch_sum(fn: Callable, problem: Problem, params, inputs, targets, vector, chunk_size, per_ex: bool):
    """Σ over chunks of ``fn(params, x, y, vector, scale)`` (the batch's scale), or with
    ``per_ex`` the per-example terms stacked (B, ...), each from a vmap over a chunk."""
    B = _check(problem, params, inputs, targets, vector)
    c = problem.scale(targets)
    chunk = check_chunk(chunk_size, B)
    parts = []
    for a, b in chunks(B, chunk):
        x, y = slice_batch(inputs, a, b), targets[a:b]
        if per_ex:
            one = in_exact_ops(lambda p, ex, yy: fn(p, _one(ex), yy.unsqueeze(0), vector, c))
            parts.append(vmap(one, in_dims=(None, in_dims(x), 0), randomness=RANDOMNESS)(params, x, y))
        else:
            part = fn(params, x, y, vector, c)
            parts.append(part)
    if per_ex:
        return pytree.tree_map(lambda *xs: torch.cat(xs), *parts)
    total = parts[0]
    for p in parts[1:]:
        total = tree_add(total, p)
    return total


def _jv_and_vjp(problem: Problem, params, x, v):
    """(outputs, J v, vjp_fn) of f = apply(·, x) at params."""
    f = lambda p: problem.apply(p, x)  # noqa: E731
    out, vjp_fn = vjp(f, params)
    _, jv = jvp(f, (params,), (v,))
    return out, jv, vjp_fn


def _ggn_chunk(problem: Problem):
    def fn(params, x, y, v, c):
        out, jv, vjp_fn = _jv_and_vjp(problem, params, x, v)
        problem.check(out, y)
        return vjp_fn(problem.output_hessian_vp(out.detach(), y, jv, c))[0]

    return fn


def hessian_vp(problem: Problem, params, inputs, targets, vector, *, chunk_size: Optional[int] = None,
               per_example: bool = False):
    """∇²L · vector of the problem's loss over the batch (or per example); see the module doc."""

    def fn(p, x, y, v, c):
        return _hvp(lambda q, b: problem.loss_value(problem.apply(q, b[0]), b[1], c), p, (x, y), v)

    return batch_sum(fn, problem, params, inputs, targets, vector, chunk_size, per_example)


def ggn_vp(problem: Problem, params, inputs, targets, vector, *, chunk_size: Optional[int] = None,
           per_example: bool = False):
    """c Jᵀ H_f J · vector over the batch (or per example); see the module doc."""
    return batch_sum(_ggn_chunk(problem), problem, params, inputs, targets, vector, chunk_size, per_example)


def _fisher_chunk(problem: Problem, kind: str, samples: int, generator):
    def fn(params, x, y, v, c):
        out, jv, vjp_fn = _jv_and_vjp(problem, params, x, v)
        problem.check(out, y)
        out = out.detach()
        if kind == "empirical":
            r = problem.output_grads(out, y)
            s = (r * jv).reshape(r.shape[0], -1).sum(1)  # (b,): ⟨g_n, v⟩ = ⟨r_n, J_n v⟩
            cot = c * r * s.reshape((-1,) + (1,) * (r.dim() - 1))
        else:
            m = problem.mask(y, out).unsqueeze(-1)
            drawn = problem.sample_targets(out, generator, samples)  # (samples, ...)
            r = m * problem.output_grads(out.expand((samples,) + tuple(out.shape)), drawn)
            cot = (r * (r * jv).sum(-1, keepdim=True)).sum(0) * (c / samples)
        return vjp_fn(cot)[0]

    return fn


def fisher_vp(problem: Problem, params, inputs, targets, vector, *, kind: str = "true", samples: int = 1,
              generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None,
              per_example: bool = False):
    """Fisher · vector: ``kind`` "true" (= the GGN for these likelihoods), "mc" (``samples``
    labels drawn per row from ``generator``) or "empirical" (true labels, per-example outer
    products). ``per_example`` with "mc" draws inside vmap (each example its own labels)."""
    check_choice("kind", kind, FISHER_KINDS)
    check_int("samples", samples, min=1)
    if kind == "true":
        return ggn_vp(problem, params, inputs, targets, vector, chunk_size=chunk_size, per_example=per_example)
    if kind == "mc" and per_example and generator is not None:
        raise ValueError("generator: per_example=True draws labels inside vmap, which cannot take a generator; "
                         "pass generator=None (seed torch's global RNG instead)")
    fn = _fisher_chunk(problem, kind, samples, generator)
    return batch_sum(fn, problem, params, inputs, targets, vector, chunk_size, per_example)
