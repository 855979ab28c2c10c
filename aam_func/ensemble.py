"""Ensembles: N models with the same structure trained at once by ``vmap`` over their params.

    params = ensemble.init(model, seeds=[0, 1, 2, 3])       # leaves (4, *shape)
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss_fn, opt)                # one batch shared by all members
    params, state, losses = step(params, state, batch)      # losses (4,)

Member m of the result equals training model m alone with the same optimizer and batches
(``tests/test_ensemble.py``): ``vmap`` maps the ordinary step over the members' leading
dimension, so no member sees another's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch.func import grad_and_value, vmap

from . import tree
from .tree import Params

__all__ = ["stack", "unstack", "init", "init_state", "train_step", "apply"]


def stack(params_list: Sequence[Mapping]) -> Params:
    """[tree_0, ..., tree_{N-1}] (same structure and shapes) -> one tree, leaves (N, *shape)."""
    params_list = list(params_list)
    if not params_list:
        raise ValueError("stack needs at least one params tree")
    for i, p in enumerate(params_list[1:], 1):
        tree.check_structure(params_list[0], p, what=f"ensemble member {i}")
    return tree.map(lambda *xs: torch.stack(xs), params_list[0], *params_list[1:])


def unstack(stacked: Mapping) -> list[Params]:
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


def train_step(loss_fn: Callable, optimizer, *, batch_per_member: bool = False):
    """``step(params, state, batch) -> (params, state, losses)`` for all members at once.

    The batch is shared (``batch_per_member=False``) or has a leading member dimension.
    """
    from .optim import apply_updates

    def one(params, state, batch):
        g, loss = grad_and_value(loss_fn)(params, batch)
        updates, state = optimizer.update(g, state, params)
        return apply_updates(params, updates), state, loss

    batched = vmap(one, in_dims=(0, 0, 0 if batch_per_member else None), randomness="different")

    def step(params, state, batch):
        return batched(params, state, batch)

    return step
