"""Rematerialisation (gradient checkpointing) that composes with ``torch.func``.

``remat(fn)`` returns a function with the same values and gradients as ``fn`` that keeps only
its inputs: the forward runs ``fn`` without recording anything, and the backward runs it again
through ``torch.func.vjp`` to get the gradient (Chen et al. 2016; Griewank & Walther 2000).
Unlike ``torch.utils.checkpoint`` (saved-tensor hooks, refused by ``torch.func.grad``), it works
under ``torch.func.grad``, ``vmap(grad)``, ``jvp`` and plain autograd, and double backward.

    block_fn = remat(lambda p, x: block.apply(p, x, positions=pos))
    y = block_fn(block_params, x)        # block_params: a nested dict of tensors

Arguments and results are pytrees (dicts, lists, tuples) of tensors and other values. Floating
tensors are differentiated; integer/bool tensors and non-tensor leaves are held fixed.

Randomness: the recomputation must replay the forward's random draws, so
- the global CPU RNG state (and CUDA's, when initialised) is saved before the forward and
  restored around the recomputation, then put back (as ``torch.utils.checkpoint`` does);
- ``torch.Generator`` objects passed among the arguments are saved and replayed the same way;
- generators captured in a closure cannot be seen: list them in ``remat(fn, generators=[g])``.
After the backward every RNG is where the forward left it. Under ``vmap(..., randomness=
"different")`` the replay follows the global state, which vmap itself derives per call: do not
rely on bitwise replay there.

Mixed precision: the autocast state at the call (enabled or not, and the dtype, per device) is
saved and re-entered around the recomputation, so under ``torch.autocast`` the backward
differentiates the function the forward ran (a backward usually runs after the autocast region
has closed; recomputing outside it would give the gradient of the float32 function instead).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._util import higher_order_active, transforms_active
from .registry import OpSpec, register

__all__ = ["remat", "reference"]


def _is_diff(x: Any) -> bool:
    return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())


class _RNGReplay:
    """Snapshot of the global RNG(s) and of given generators; ``replay()`` is a context that runs
    its body from the snapshot and restores the states it found."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.states = [g.get_state() for g in self.generators]

    def replay(self):
        outer = self

        class _Ctx:
            def __enter__(self):
                self.cpu = torch.get_rng_state()
                self.cuda = torch.cuda.get_rng_state_all() if outer.cuda is not None else None
                self.states = [g.get_state() for g in outer.generators]
                torch.set_rng_state(outer.cpu)
                if outer.cuda is not None:
                    torch.cuda.set_rng_state_all(outer.cuda)
                for g, s in zip(outer.generators, outer.states):
                    g.set_state(s)

            def __exit__(self, *exc):
                torch.set_rng_state(self.cpu)
                if self.cuda is not None:
                    torch.cuda.set_rng_state_all(self.cuda)
                for g, s in zip(outer.generators, self.states):
                    g.set_state(s)
                return False

        return _Ctx()


class _Spec:
    """What the Function needs besides tensors. An opaque object on purpose: functorch rebuilds
    pytree containers among Function arguments, and ``out_box`` must be shared, not copied."""

    __slots__ = ("fn", "in_tree", "fixed", "positions", "rng", "out_box", "keep_graph", "amp")

    def __init__(self, fn, in_tree, fixed, positions, rng, out_box, keep_graph, amp):
        self.fn, self.in_tree, self.fixed, self.positions, self.rng, self.out_box = fn, in_tree, fixed, positions, rng, out_box
        self.keep_graph = keep_graph  # (eager, higher_order) seen by the caller
        self.amp = amp  # ((device_type, enabled, dtype), ...) at the call

    def recompute(self):
        """The context of a recomputation: the call's RNG states and autocast state."""
        stack = contextlib.ExitStack()
        for dev, enabled, dtype in self.amp:
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
        stack.enter_context(self.rng.replay())
        return stack

    def __iter__(self):
        return iter((self.fn, self.in_tree, self.fixed, self.positions, self.rng, self.out_box))

    def __getitem__(self, i):
        return tuple(self)[i]


class _Remat(torch.autograd.Function):
    """forward: run ``fn`` on the leaves, record nothing. backward: vjp of a recomputation.

    Args after ``spec``: every tensor leaf of the inputs (only floating ones are differentiated).
    ``spec = (fn, in_tree, leaves_without_tensors, tensor_positions, rng, out_box)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, *tensors):
        fn, in_tree, fixed, positions, rng, out_box = spec
        out = _call(fn, in_tree, fixed, positions, tensors)
        flat_out, out_tree = pytree.tree_flatten(out)
        out_box["tree"] = out_tree
        out_box["tensor_mask"] = [isinstance(o, Tensor) for o in flat_out]
        out_box["consts"] = [None if isinstance(o, Tensor) else o for o in flat_out]
        out_box["diff_out"] = [_is_diff(o) for o in flat_out if isinstance(o, Tensor)]
        return tuple(o for o in flat_out if isinstance(o, Tensor))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, *tensors = inputs
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.mark_non_differentiable(*[o for o in output if not _is_diff(o)])

    @staticmethod
    def backward(ctx, *grad_outs):
        tensors = ctx.saved_tensors
        eager, higher_order = ctx.spec.keep_graph
        if not eager and not higher_order:
            # A single torch.func.grad level: nobody will differentiate this gradient, but functorch
            # runs backward with create_graph=True. Detach the inputs and the cotangents (tracked
            # at that level; vjp_fn is linear in them), else every block's recomputed graph stays
            # alive until the end of the backward and remat saves nothing. (Eager: grad mode is
            # off in backward unless create_graph, so there is nothing to detach.)
            tensors = tuple(t.detach() for t in tensors)
            grad_outs = tuple(g.detach() if g is not None else None for g in grad_outs)
        f, diff = _diff_fn(ctx.spec, tensors)
        with ctx.spec.recompute():
            outs, vjp_fn = torch.func.vjp(f, *[tensors[i] for i in diff])
        cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, _only_diff(grad_outs, ctx.spec)))
        grads = iter(vjp_fn(cot))
        return (None, *[next(grads) if i in diff else None for i in range(len(tensors))])

    @staticmethod
    def jvp(ctx, _spec_tangent, *tangents):
        tensors = ctx.saved_tensors
        f, diff = _diff_fn(ctx.spec, tensors)
        primals = tuple(tensors[i] for i in diff)
        tans = tuple(torch.zeros_like(tensors[i]) if tangents[i] is None else tangents[i] for i in diff)
        # J t by the double-vjp identity J t = ∂/∂u ⟨Jᵀ u, t⟩ (vjp is linear in u): reverse mode
        # only, because forward AD cannot nest inside the dual level that called this rule.
        with ctx.spec.recompute():
            outs, vjp_fn = torch.func.vjp(f, *primals)
        u0 = tuple(torch.zeros_like(o) for o in outs)
        _, vjp_of_vjp = torch.func.vjp(lambda *u: vjp_fn(u), *u0)
        out_t = vjp_of_vjp(tans)
        out_t = iter(out_t)
        mask = ctx.spec[5]["diff_out"]
        return tuple(next(out_t) if m else None for m in mask)


def _autocast_state() -> tuple:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


def _call(fn, in_tree, fixed, positions, tensors):
    leaves = list(fixed)
    for pos, leaf in zip(positions, tensors):
        leaves[pos] = leaf
    args, kwargs = pytree.tree_unflatten(leaves, in_tree)
    return fn(*args, **kwargs)


def _diff_fn(spec, tensors):
    """(f, diff): f maps the floating input tensors to the floating output tensors."""
    fn, in_tree, fixed, positions, rng, out_box = spec
    diff = [i for i, t in enumerate(tensors) if _is_diff(t)]

    def f(*diff_tensors):
        full = list(tensors)
        for i, t in zip(diff, diff_tensors):
            full[i] = t
        out = _call(fn, in_tree, fixed, positions, full)
        return tuple(o for o in pytree.tree_leaves(out) if _is_diff(o))

    return f, diff


def _only_diff(grad_outs, spec):
    return [g for g, m in zip(grad_outs, spec[5]["diff_out"]) if m]


def remat(fn: Callable, *, generators: Sequence[torch.Generator] = ()) -> Callable:
    """``fn`` with the same values and gradients, keeping only its inputs for the backward.

    ``generators`` lists ``torch.Generator`` objects that ``fn`` uses from a closure (those
    passed as arguments are found automatically); see the module docstring for the RNG rule.
    """
    if not callable(fn):
        raise TypeError(f"remat needs a callable, got {type(fn).__name__}")
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"remat generators must be torch.Generator objects, got {type(g).__name__}")

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        leaves, in_tree = pytree.tree_flatten((args, kwargs))
        positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        fixed = [None if isinstance(x, Tensor) else x for x in leaves]
        gens = list(generators) + [x for x in leaves if isinstance(x, torch.Generator)]
        out_box: dict = {}
        keep_graph = (not transforms_active(), higher_order_active())
        spec = _Spec(fn, in_tree, fixed, positions, _RNGReplay(gens), out_box, keep_graph, _autocast_state())
        tensor_outs = _Remat.apply(spec, *[leaves[i] for i in positions])
        it = iter(tensor_outs)
        flat = [next(it) if is_t else c for is_t, c in zip(out_box["tensor_mask"], out_box["consts"])]
        return pytree.tree_unflatten(flat, out_box["tree"])

    return wrapped


def reference(fn: Callable, *, generators: Sequence[torch.Generator] = ()) -> Callable:
    """The composite twin: ``fn`` itself (autograd records every intermediate)."""
    return fn


# --------------------------------------------------------------------------- registry sample
def _mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return torch.tanh(x @ w1) @ w2


def _remat_mlp(x, w1, w2):
    return remat(_mlp)(x, w1, w2)


def _remat_tree(x, w):
    return remat(lambda p, x: {"y": torch.sin(x * p["w"]["a"]).sum(-1), "n": 3}["y"])({"w": {"a": w}}, x)


def _tree_ref(x, w):
    return torch.sin(x * w).sum(-1)


def _sample_ref(*args):
    return _mlp(*args) if len(args) == 3 else _tree_ref(*args)


def _sample_op(*args):
    return _remat_mlp(*args) if len(args) == 3 else _remat_tree(*args)


def _samples() -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return [((r(3, 4), r(4, 5), r(5, 2)), {}), ((r(2, 3), r(3)), {})]


register(OpSpec(name="remat", function=_Remat, op=_sample_op, reference=_sample_ref, proof="proofs/remat.md",
                samples=_samples, supports_forward_ad=True, supports_double_backward=True))
