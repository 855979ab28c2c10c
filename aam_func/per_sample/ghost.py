"""The ghost route: per-example norms, clipped sums and gradients without per-example weight
gradients for the linear and embedding weights (``method="ghost"``).

One vmapped forward and one backward that stops at activations give, for every use of such a
weight, its inputs x (B, N, in) and output gradients g (B, N, out); the per-example gradient is
G_i = Σ_t g_it x_itᵀ, so ‖G_i‖² = Σ_{t,s} (g_it·g_is)(x_it·x_is) (Goodfellow 2015; Li et al.
2022), or ‖g_iᵀ x_i‖² directly when that is cheaper; the clipped sum is Σ_i w_i g_iᵀ x_i, one
matmul (Bu et al. 2023's book-keeping). Other parameters (norms, biases, anything used
otherwise) get exact per-example gradients from the same backward. Derivation and tests:
``proofs/per_sample.md`` §2-3b.

The uses are found by :class:`aam_func.intercept.Intercept`, with two clients: ``_Recorder``
(discovery, on the first example) and ``_Prober`` (the pass: a zero probe on each use's output,
whose gradient is g, and the use's input kept).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vjp, vmap

from ..intercept import Client, Intercept, Use
from ..tree import Params
from .batching import RANDOMNESS, batch_size, check_chunk, chunks, in_dims, per_example, slice_batch
from .exact_ops import exact_ops, param_names
from .factors import factors, norms_and_weighted_sum, write_factors
from .paths import named_leaves

__all__ = ["GhostMismatch", "GhostUse", "Discovery", "discover", "ghost_pass", "ghost_grads", "ghost_norms_and_sum",
           "GHOST_CHUNK_FRACTION", "GHOST_MIN_CHUNK", "GHOST_CHUNK_ELEMENTS"]


class GhostMismatch(RuntimeError):
    """The examples do not share one sequence / shape of linear and embedding uses."""


class GhostUse(NamedTuple):
    name: str  # dotted parameter name of the weight
    kind: str  # "linear", "addmm", "embedding" or "conv" (aam_func.intercept.Use.kind)
    shape: tuple  # the op's output shape for one example (batch of one)
    dtype: torch.dtype
    padding_idx: Optional[int] = None  # an embedding's row that receives no gradient
    options: Optional[dict] = None  # a conv's stride, padding, dilation, groups


@dataclass(frozen=True)
class Discovery:
    """What one run on the first example found: every recognised use in call order (``uses``),
    the weights also used otherwise (``other``: exact route), and the rest (``ghost``) with their
    uses (``ghost_uses``)."""

    uses: tuple
    other: frozenset
    ghost: frozenset
    ghost_uses: tuple


class _Recorder(Client):
    """Discovery: records each recognised use; a weight used any other way, by a
    frequency-scaled embedding or by a grouped conv, is marked for the exact route."""

    def __init__(self):
        self.uses: list[GhostUse] = []
        self.others: set[str] = set()

    def _record(self, use: Use) -> Tensor:
        out = use.run()
        if use.plain:
            self.uses.append(GhostUse(use.key, use.kind, tuple(out.shape), out.dtype, use.padding_idx, use.options))
        else:
            self.others.add(use.key)
        return out

    linear = embedding = conv = _record

    def other(self, key, tensor):
        self.others.add(key)
        return tensor


def _candidates(params) -> dict[str, Tensor]:
    """The 2-D (linear, embedding) and 3-/4-D (conv) floating leaves, except tensors that appear
    under two names (exact route)."""
    flat, _ = named_leaves(params)
    cands = {n: v for n, v in flat.items() if isinstance(v, Tensor) and 2 <= v.dim() <= 4 and v.is_floating_point()}
    count = Counter(id(v) for v in cands.values())
    return {n: v for n, v in cands.items() if count[id(v)] == 1}


def discover(loss_fn: Callable, params: Params, batch) -> Discovery:
    """Run the loss on the first example and sort the weights into ghost and exact ones."""
    rec = _Recorder()
    with torch.no_grad(), Intercept(_candidates(params), rec, ops=exact_ops(param_names(params))):
        loss_fn(params, slice_batch(batch, 0, 1))
    ghost = frozenset({u.name for u in rec.uses} - rec.others)
    return Discovery(tuple(rec.uses), frozenset(rec.others), ghost, tuple(u for u in rec.uses if u.name in ghost))


class _Prober(Client):
    """The ghost pass (under vmap): each use of a ghost weight gets its zero probe added and its
    input kept, in discovery's order; a different order or shape is a :class:`GhostMismatch`.
    Every lookup and batch norm runs through :func:`.exact_ops.exact_ops` (``ops=``)."""

    def __init__(self, d: Discovery, probes: list):
        self.d, self.probes, self.inputs, self.k = d, probes, [], 0

    def linear(self, use: Use) -> Tensor:
        return self._probe(use) if use.key in self.d.ghost else use.run()

    embedding = conv = linear

    def _probe(self, use: Use) -> Tensor:
        k, uses = self.k, self.d.ghost_uses
        want = uses[k] if k < len(uses) else None
        if want is None or (want.name, want.kind, want.padding_idx) != (use.key, use.kind, use.padding_idx):
            expected = f"{want.kind}({want.name!r})" if want else "no further use"
            raise GhostMismatch(
                f"per-example control flow differs from the first example: use #{k} is {use.kind}({use.key!r}), "
                f"expected {expected}; use method='vmap'"
            )
        out = use.run()
        if tuple(out.shape) != want.shape:
            raise GhostMismatch(
                f"{use.kind}({use.key!r}) output has shape {tuple(out.shape)} but {want.shape} for the first example; "
                "ghost clipping needs equally shaped examples (pad them), or use method='vmap'"
            )
        self.inputs.append(use.input)
        self.k += 1
        return out + self.probes[k]


def ghost_pass(loss_fn: Callable, params: Params, batch, d: Discovery):
    """One forward + one activation-only backward: per-example losses, exact per-example grads
    of the non-ghost params, and per ghost weight the (L, ids, R) factors of each use."""
    B = batch_size(batch)
    flat, rebuild = named_leaves(params)
    small = {n: v for n, v in flat.items() if n not in d.ghost}
    big = {n: v for n, v in flat.items() if n in d.ghost}
    small_b = {n: v.expand((B,) + tuple(v.shape)) for n, v in small.items()}
    device = next(iter(big.values())).device if big else None  # the probes live where the outputs do
    probes = [torch.zeros((), dtype=u.dtype, device=device).expand((B,) + u.shape) for u in d.ghost_uses]
    per_one = per_example(loss_fn)

    def one(small_p, probe_list, example):
        prober = _Prober(d, probe_list)
        tables = {n: v for n, v in small_p.items() if 2 <= v.dim() <= 4 and v.is_floating_point()}
        inner = rebuild({n: small_p[n] if n in small_p else big[n] for n in flat})
        with Intercept({**big, **tables}, prober, ops=exact_ops(param_names(inner))):
            loss = per_one(inner, example)
        if prober.k != len(d.ghost_uses):
            raise GhostMismatch(
                f"per-example control flow differs from the first example: {prober.k} linear/embedding uses, "
                f"expected {len(d.ghost_uses)}; use method='vmap'"
            )
        return loss, list(prober.inputs)

    batched = vmap(one, in_dims=(0, 0, in_dims(batch)), randomness=RANDOMNESS)
    loss, vjp_fn, inputs = vjp(lambda s, p: batched(s, p, batch), small_b, probes, has_aux=True)
    # called once: retain_graph=False lets autograd free each saved activation as its node
    # runs (vjp_fn keeps the whole graph by default), which lowers the chunk's peak
    small_grads, probe_grads = vjp_fn(torch.ones_like(loss), retain_graph=False)
    uses: dict[str, list] = {}
    for use, x, g in zip(d.ghost_uses, inputs, probe_grads):
        # x, g: (B, 1, ..., features); the per-example batch of one is dim 1
        kernel = tuple(flat[use.name].shape[2:])
        uses.setdefault(use.name, []).append(factors(use.kind, x, g, use.padding_idx, use.options, kernel))
    return loss.detach(), small_grads, uses


# The default chunk keeps one chunk's work (activations, output gradients, the exact-route
# leaves' per-example gradients) near this fraction of the result's size, with at least
# GHOST_MIN_CHUNK examples per chunk (each chunk's vmap and function-mode setup costs about as
# much as one example's backward on small models), and never splits a batch whose whole work
# fits in GHOST_CHUNK_ELEMENTS elements (64 MiB of float32): small models (a CNN) then run one
# vmapped pass instead of many, each paying that setup.
GHOST_CHUNK_FRACTION = 0.15
GHOST_MIN_CHUNK = 2
GHOST_CHUNK_ELEMENTS = 1 << 24


def _ghost_chunk(d: Discovery, flat, B: int) -> int:
    """Examples per chunk for ``ghost_grads(chunk_size=None)``: the per-example work is
    estimated as four times the recorded uses' outputs (activations, output gradients, softmax
    and friends), against the per-example result size (all parameters)."""
    n_params = sum(v.numel() for v in flat.values() if isinstance(v, Tensor))
    per_example = max(1, 4 * sum(math.prod(u.shape) for u in d.uses))
    chunk = int(GHOST_CHUNK_FRACTION * B * n_params / per_example)
    return max(1, min(B, max(GHOST_MIN_CHUNK, chunk, GHOST_CHUNK_ELEMENTS // per_example)))


def ghost_grads(loss_fn: Callable, params: Params, batch, chunk_size: Optional[int], d: Discovery) -> Params:
    """Full per-example gradients from the ghost pass, chunk by chunk, into a preallocated result."""
    B = batch_size(batch)
    flat, rebuild = named_leaves(params)
    chunk = check_chunk(chunk_size, B) if chunk_size is not None else _ghost_chunk(d, flat, B)
    out = {n: v.new_empty((B,) + tuple(v.shape)) for n, v in flat.items()}
    for start, stop in chunks(B, chunk):
        _, small_grads, uses = ghost_pass(loss_fn, params, slice_batch(batch, start, stop), d)
        for name, g in small_grads.items():
            out[name][start:stop].copy_(g)
        del small_grads
        while uses:  # popped, so each weight's factors are freed once written
            name, fs = uses.popitem()
            write_factors(out[name][start:stop], fs)
            del fs
    return rebuild(out)


def ghost_norms_and_sum(loss_fn: Callable, params: Params, batch, max_norm: float, chunk: int, want_sum: bool):
    """(norms (B,), losses (B,), Σ_i clip_C(g_i) or None) from the ghost pass, chunk by chunk."""
    B = batch_size(batch)
    d = discover(loss_fn, params, batch)
    flat, rebuild = named_leaves(params)
    all_norms, all_losses, total = [], [], None
    for start, stop in chunks(B, chunk):
        loss, small_grads, uses = ghost_pass(loss_fn, params, slice_batch(batch, start, stop), d)
        # the materialised small grads' part of ‖g_i‖², then each ghost weight's ‖Σ_t δ_t a_tᵀ‖²
        n, part = norms_and_weighted_sum(small_grads, uses, flat, stop - start, max_norm, want_sum)
        all_norms.append(n)
        all_losses.append(loss)
        if want_sum:
            part = rebuild(part)
            total = part if total is None else pytree.tree_map(torch.add, total, part)
    return torch.cat(all_norms), torch.cat(all_losses), total
