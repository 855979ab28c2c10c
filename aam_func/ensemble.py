"""Ensembles: N models with the same structure trained at once by ``vmap`` over their params.

    params = ensemble.init(model, seeds=[0, 1, 2, 3])       # leaves (4, *shape)
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss_fn, opt)                # one batch shared by all members
    params, state, losses = step(params, state, batch)      # losses (4,)

Member m of the result equals training model m alone with the same optimizer and batches
(``tests/test_ensemble.py``): ``vmap`` maps the ordinary step over the members' leading
dimension, so no member sees another's parameters.

Any params form works (nested dicts, flat ``named_parameters()`` dicts, lists ...), and so do a
user's own ``nn.Module`` s, as ``torch.func.stack_module_state`` stacks them::

    apply, params, buffers = ensemble.from_modules([make_model() for _ in range(4)])
    step = ensemble.train_step(loss_fn, opt, with_buffers=True)   # loss_fn(p, b, batch) -> (loss, b)
    params, buffers, state, losses = step(params, buffers, state, batch)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch.func import grad_and_value, vmap

from . import tree
from .tree import Params

__all__ = ["stack", "unstack", "init", "init_state", "train_step", "apply", "from_modules"]


def stack(params_list: Sequence) -> Params:
    """[tree_0, ..., tree_{N-1}] (same structure and shapes) -> one tree, leaves (N, *shape)."""
    params_list = list(params_list)
    if not params_list:
        raise ValueError("stack needs at least one params tree")
    for i, p in enumerate(params_list[1:], 1):
        tree.check_structure(params_list[0], p, what=f"ensemble member {i}")
    return tree.map(lambda *xs: torch.stack(xs), params_list[0], *params_list[1:])


def unstack(stacked) -> list[Params]:
    """Inverse of :func:`stack`: one tree per member."""
    sizes = {x.shape[0] for x in tree.leaves(stacked)}
    if len(sizes) != 1:
        raise ValueError(f"stacked params disagree on the number of members: {sorted(sizes)}")
    n = sizes.pop()
    return [tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def init(spec, seeds: Sequence[int], **kwargs) -> Params:
    """``stack([spec.init(seed=s) for s in seeds])``: one member per seed."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("init needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (equal seeds give identical members), got {seeds}")
    return stack([spec.init(seed=s, **kwargs) for s in seeds])


init_ensemble = init


def from_modules(modules: Sequence[torch.nn.Module]):
    """``(apply, params, buffers)`` of N modules of one architecture (as
    ``torch.func.stack_module_state``): :func:`aam_func.nn.functionalize` of the first, its
    ``apply`` shared, every parameter and buffer stacked over the members (leaves (N, *shape)).
    ``vmap(apply)(params, buffers, x)`` runs every member; the modules are not changed."""
    from .nn import Functional, functionalize

    modules = list(modules)
    if not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
        raise TypeError(f"from_modules needs a non-empty list of torch.nn.Module, got {modules!r}")
    parts = [functionalize(m) for m in modules]
    kinds = {type(m).__name__ for m in modules}
    if len({type(m) for m in modules}) != 1:
        raise ValueError(f"from_modules needs modules of one class, got {sorted(kinds)}")
    params = stack([p.params for p in parts])
    buffers = stack([p.buffers for p in parts]) if parts[0].buffers else {}
    return Functional(parts[0].apply, params, buffers)


def init_state(optimizer, stacked_params: Mapping):
    """The optimizer state of every member (vmapped ``optimizer.init``), on the params' device.

    Optimizers keep their step counts as 0-d CPU tensors, which mix with CUDA tensors; stacked
    over members they become (N,) tensors, which do not, so every state leaf is moved to the
    members' device."""
    state = vmap(optimizer.init, randomness="different")(stacked_params)
    leaves = tree.leaves(stacked_params)
    if not leaves:
        return state
    device = leaves[0].device
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, state)


def apply(fn: Callable, stacked_params: Mapping, *args, in_dims=None):
    """``fn(params_m, *args)`` for every member m (args shared unless ``in_dims`` says otherwise)."""
    dims = (0,) + (tuple(in_dims) if in_dims is not None else (None,) * len(args))
    return vmap(fn, in_dims=dims, randomness="different")(stacked_params, *args)


def train_step(loss_fn: Callable, optimizer, *, batch_per_member: bool = False, with_buffers: bool = False):
    """``step(params, state, batch) -> (params, state, losses)`` for all members at once.

    The batch is shared (``batch_per_member=False``) or has a leading member dimension. With
    ``with_buffers`` (a module's buffers, :func:`from_modules`): ``loss_fn(params, buffers, batch)
    -> (loss, new_buffers)`` and ``step(params, buffers, state, batch) -> (params, buffers, state,
    losses)``.
    """
    from .optim import apply_updates

    def one(params, state, batch):
        g, loss = grad_and_value(loss_fn)(params, batch)
        updates, state = optimizer.update(g, state, params)
        return apply_updates(params, updates), state, loss

    def one_with_buffers(params, buffers, state, batch):
        g, (loss, buffers) = grad_and_value(loss_fn, has_aux=True)(params, buffers, batch)
        updates, state = optimizer.update(g, state, params)
        return apply_updates(params, updates), buffers, state, loss

    bdim = 0 if batch_per_member else None
    if with_buffers:
        return vmap(one_with_buffers, in_dims=(0, 0, 0, bdim), randomness="different")
    batched = vmap(one, in_dims=(0, 0, bdim), randomness="different")

    def step(params, state, batch):
        return batched(params, state, batch)

    return step
