"""Per-example gradients, their norms, the DP-SGD clipped sum, and attribution helpers.

``loss_fn(params, batch) -> scalar`` is the ordinary training loss on a batch whose tensors share
a leading batch dimension (a tensor, or a dict / tuple / list of them; non-tensor leaves are
passed through unchanged). "Per example" means ``loss_fn`` evaluated on that example alone, as a
batch of one: ``loss_i = loss_fn(params, batch[i:i+1])``.

    g = per_sample.grads(loss, params, batch)                   # Params, leaves (B, *shape)
    n = per_sample.norms(loss, params, batch)                   # (B,) global L2 norms
    c = per_sample.clipped_sum(loss, params, batch, max_norm=1.0)   # Σ_i min(1, C/‖g_i‖) g_i

Two methods compute norms, clipped sums and (``grads``) full per-example gradients:

- ``"vmap"``: ``vmap(grad)`` over chunks of ``chunk_size`` examples; only one chunk of
  per-example gradients exists at a time.
- ``"ghost"`` (default): no per-example gradient of a linear or embedding weight is ever formed.
  One vmapped forward and one backward that stops at activations give, for every use of such a
  weight, its inputs x (B, N, in) and output gradients g (B, N, out); the per-example gradient is
  G_i = Σ_t g_it x_itᵀ, so ‖G_i‖² = Σ_{t,s} (g_it·g_is)(x_it·x_is) (Goodfellow 2015; Li et al.
  2022), or ‖g_iᵀ x_i‖² directly when that is cheaper; the clipped sum is Σ_i w_i g_iᵀ x_i, one
  matmul (Bu et al. 2023's book-keeping). Other parameters (norms, biases, anything used
  otherwise) get exact per-example gradients from the same backward, cheaply. ``grads`` writes
  G_i = g_iᵀ x_i (``bmm``) and the embedding rows (``index_add``) straight into its preallocated
  result, one chunk at a time.
  Derivation and tests: ``proofs/per_sample.md``.

The linear/embedding uses are found by a ``TorchFunctionMode`` that watches ``F.linear`` and
``F.embedding`` calls whose weight is a leaf of ``params``; layers need no hooks. A weight that
is used in any other way (indexed, multiplied, transposed) falls back to the exact vmap route.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from . import tree
from .tree import Params

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
]

METHODS = ("ghost", "vmap")
# Each example draws its own random numbers (dropout) from the global RNG, as a loop would.
# (It also lets a model build random-initialised shape templates under vmap.)
RANDOMNESS = "different"
CLIP_EPS = 1e-6  # w_i = min(1, C / (‖g_i‖ + eps)), as Opacus: keeps ‖w_i g_i‖ < C and no 0/0


# ----------------------------------------------------------------------------- batches


def _flat_batch(batch) -> tuple[list, Any]:
    leaves, spec = pytree.tree_flatten(batch)
    return leaves, spec


def batch_size(batch) -> int:
    """The shared leading dimension of the batch's tensors; a clear error when there is none."""
    leaves, _ = _flat_batch(batch)
    tensors = [(i, x) for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    if not tensors:
        raise ValueError(f"batch holds no tensors (got {type(batch).__name__}); per-example work needs a batch dimension")
    sizes = {}
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


def _map_batch(fn, batch):
    leaves, spec = _flat_batch(batch)
    return pytree.tree_unflatten([fn(x) if isinstance(x, Tensor) else x for x in leaves], spec)


def _slice(batch, start: int, stop: int):
    return _map_batch(lambda x: x[start:stop], batch)


def _in_dims(batch):
    leaves, spec = _flat_batch(batch)
    return pytree.tree_unflatten([0 if isinstance(x, Tensor) else None for x in leaves], spec)


def _as_batch_of_one(example):
    return _map_batch(lambda x: x.unsqueeze(0), example)


def _check_chunk(chunk_size, B: int) -> int:
    if chunk_size is None:
        return max(B, 1)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_max_norm(max_norm) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (max_norm > 0):
        raise ValueError(f"max_norm must be a number > 0 (float('inf') disables clipping), got {max_norm!r}")
    return float(max_norm)


def _per_example(loss_fn):
    """``loss_fn`` on one example (vmap strips the batch dim; we put a batch of one back)."""
    return lambda params, example: loss_fn(params, _as_batch_of_one(example))


def _warm_then(call, loss_fn, params, batch):
    """``call()``; if it fails because the model draws random numbers under vmap the first time
    it sees a config (``Transformer.check_params`` builds its shape template by a random init,
    cached per config), run the loss once outside vmap to fill that cache and call again.
    A workaround until the model builds the template with functorch disabled."""
    try:
        return call()
    except RuntimeError as e:
        if "randomness" not in str(e):
            raise
        with torch.no_grad():
            loss_fn(params, _slice(batch, 0, 1))
        return call()


def _warm_first(per, loss_fn, params, batch):
    """``per`` whose first call goes through :func:`_warm_then`."""
    state = {"first": True}

    def call(*args):
        if state["first"]:
            state["first"] = False
            return _warm_then(lambda: per(*args), loss_fn, params, batch)
        return per(*args)

    return call


def _chunks(B: int, chunk: int):
    for start in range(0, B, chunk):
        yield start, min(B, start + chunk)


# ----------------------------------------------------------------------------- small helpers


def global_norms(per_example: Mapping) -> Tensor:
    """(B,) global L2 norms of a tree whose leaves carry a leading batch dim."""
    sq = [x.reshape(x.shape[0], -1).float().pow(2).sum(1) for x in tree.leaves(per_example)]
    return torch.stack(sq).sum(0).sqrt()


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """w_i = min(1, C / (‖g_i‖ + 1e-6)): ‖w_i g_i‖ ≤ C always, w_i = 1 when C = inf."""
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def _weighted_sum(weights: Tensor, per_example: Mapping) -> Params:
    return tree.map(lambda x: torch.tensordot(weights.to(x.dtype), x, dims=1), per_example)


# ----------------------------------------------------------------------------- vmap route


def grads(
    loss_fn: Callable,
    params: Params,
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
    - ``"auto"`` (default): ``"ghost"`` for gradients w.r.t. params (``argnums=0``) when some
      weight is used only by ``F.linear`` / ``F.embedding``; otherwise, or if the examples run
      different op sequences, ``"vmap"``.

    ``argnums`` as in ``torch.func.grad`` over ``(params, batch)``: 0 for params, 1 for the
    example's own tensors (input saliency), (0, 1) for both (these use ``"vmap"``).
    """
    B = batch_size(batch)
    if method not in ("auto",) + METHODS:
        raise ValueError(f"method must be one of {('auto',) + METHODS}, got {method!r}")
    _check_chunk(chunk_size, B)
    if B == 0:
        raise ValueError("batch is empty (batch size 0); there are no per-example gradients to compute")
    if method == "ghost" and argnums != 0:
        raise ValueError("method='ghost' computes gradients w.r.t. params only (argnums=0); use method='vmap'")
    if method != "vmap" and argnums == 0:
        mode = _discover(loss_fn, params, batch)
        if method == "ghost" or mode.ghost:
            try:
                return _ghost_grads(loss_fn, params, batch, chunk_size, mode)
            except _GhostMismatch:
                if method == "ghost":
                    raise
    return _vmap_grads(loss_fn, params, batch, chunk_size, argnums)


def _vmap_grads(loss_fn, params, batch, chunk_size, argnums):
    B = batch_size(batch)
    chunk = _check_chunk(chunk_size, B)
    per = vmap(grad(_per_example(loss_fn), argnums=argnums), in_dims=(None, _in_dims(batch)), randomness=RANDOMNESS)
    if chunk >= B:
        return _warm_then(lambda: per(params, batch), loss_fn, params, batch)
    per = _warm_first(per, loss_fn, params, batch)
    out_leaves, out_spec = None, None
    for start, stop in _chunks(B, chunk):
        part, spec = pytree.tree_flatten(per(params, _slice(batch, start, stop)))
        if out_leaves is None:
            out_spec = spec
            out_leaves = [x.new_empty((B,) + tuple(x.shape[1:])) for x in part]
        for dst, src in zip(out_leaves, part):
            dst[start:stop].copy_(src)
        del part
    return pytree.tree_unflatten(out_leaves, out_spec)


# The ghost route's default chunk keeps one chunk's work (activations, output gradients, the
# fallback leaves' per-example gradients) near this fraction of the result's size, with at least
# GHOST_MIN_CHUNK examples per chunk (each chunk's vmap and function-mode setup costs about as
# much as one example's backward on small models).
GHOST_CHUNK_FRACTION = 0.15
GHOST_MIN_CHUNK = 2


def _ghost_chunk(mode, flat, B: int) -> int:
    """Examples per chunk for ``grads(method="ghost", chunk_size=None)``: the per-example work is
    estimated as four times the recorded uses' outputs (activations, output gradients, softmax
    and friends), against the per-example result size (all parameters)."""
    n_params = sum(v.numel() for v in flat.values() if isinstance(v, Tensor))
    per_use = sum(math.prod(u.shape) for u in mode.uses)
    chunk = int(GHOST_CHUNK_FRACTION * B * n_params / max(1, 4 * per_use))
    return max(1, min(B, max(GHOST_MIN_CHUNK, chunk)))


def _ghost_grads(loss_fn, params, batch, chunk_size, mode):
    """Full per-example gradients from the ghost pass, chunk by chunk, into a preallocated result."""
    B = batch_size(batch)
    flat = tree.flatten(params)
    chunk = _check_chunk(chunk_size, B) if chunk_size is not None else _ghost_chunk(mode, flat, B)
    out = {n: v.new_empty((B,) + tuple(v.shape)) for n, v in flat.items()}
    for start, stop in _chunks(B, chunk):
        _, small_grads, uses = _ghost_pass(loss_fn, params, _slice(batch, start, stop), mode)
        for name, g in small_grads.items():
            out[name][start:stop].copy_(g)
        del small_grads
        while uses:  # popped, so each weight's factors are freed once written
            name, factors = uses.popitem()
            _write_factors(out[name][start:stop], factors)
            del factors
    return tree.unflatten(out)


def _write_factors(dst: Tensor, factors: list) -> None:
    """dst (b, out, in) = Σ over one weight's uses of its per-example gradients: the linear uses
    first (the first one writes ``bmm(gᵀ, x)`` over dst, so dst needs no zeroing; the others add
    with ``baddbmm_``), then the embedding uses' rows by ``index_add_`` (onto zeros if no linear
    use wrote first). For a tied embedding/LM head this is one bmm and one index_add, not a
    zero fill, an index_add and a (V, d) read-modify-write per example."""
    b, rows = dst.shape[0], dst.shape[1]
    written = False
    for L, ids, R in factors:
        if ids:
            continue
        Lt, R = L.transpose(1, 2).to(dst.dtype), R.to(dst.dtype)
        if written:
            dst.baddbmm_(Lt, R)
        else:
            torch.bmm(Lt, R, out=dst)
            written = True
    for L, ids, R in factors:
        if not ids:
            continue
        # embedding: example i's rows ids[i] receive its output gradients
        if not written:
            dst.zero_()
            written = True
        index = (L + torch.arange(b, device=L.device)[:, None] * rows).reshape(-1)
        dst.view(b * rows, -1).index_add_(0, index, R.reshape(-1, R.shape[-1]).to(dst.dtype))


def losses(loss_fn: Callable, params: Params, batch, *, chunk_size: Optional[int] = None) -> Tensor:
    """(B,) per-example losses ``loss_fn(params, batch[i:i+1])`` (a vmapped forward)."""
    B = batch_size(batch)
    chunk = _check_chunk(chunk_size, B)
    per = vmap(_per_example(loss_fn), in_dims=(None, _in_dims(batch)), randomness=RANDOMNESS)
    if B == 0:
        return torch.zeros(0)
    per = _warm_first(per, loss_fn, params, batch)
    return torch.cat([per(params, _slice(batch, a, b)) for a, b in _chunks(B, chunk)])


def _vmap_norms_and_sum(loss_fn, params, batch, max_norm, chunk, want_sum):
    B = batch_size(batch)
    per = vmap(grad_and_value(_per_example(loss_fn)), in_dims=(None, _in_dims(batch)), randomness=RANDOMNESS)
    per = _warm_first(per, loss_fn, params, batch)
    all_norms, all_losses, total = [], [], None
    for start, stop in _chunks(B, chunk):
        g, loss = per(params, _slice(batch, start, stop))
        n = global_norms(g)
        all_norms.append(n)
        all_losses.append(loss.detach())
        if want_sum:
            part = _weighted_sum(clip_factors(n, max_norm), g)
            total = part if total is None else tree.map(torch.add, total, part)
        del g
    return torch.cat(all_norms), torch.cat(all_losses), total


# ----------------------------------------------------------------------------- ghost route


_METADATA_FUNCS = {
    Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.ndimension, Tensor.element_size, Tensor.__len__, Tensor.get_device,
}


def _plain_embedding(args, kwargs) -> bool:
    """An embedding lookup whose weight gradient is a plain row scatter (no padding_idx,
    max_norm renormalisation, frequency scaling or sparse gradient)."""
    extra = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]), **kwargs)
    return (
        extra.get("padding_idx") is None
        and extra.get("max_norm") is None
        and not extra.get("scale_grad_by_freq", False)
        and not extra.get("sparse", False)
    )


class _GhostMismatch(RuntimeError):
    """The examples do not share one sequence / shape of linear and embedding uses."""


class _Use(NamedTuple):
    name: str  # dotted parameter name of the weight
    kind: str  # "linear" or "embedding"
    shape: tuple  # the op's output shape for one example (batch of one)
    dtype: torch.dtype


class _WatchLinear(TorchFunctionMode):
    """Finds and rewires the ``F.linear`` / ``F.embedding`` uses of the weights in ``weights``.

    ``discover``: runs the loss once and records every use in call order; a weight that any
    other op touches is marked unusable (it falls back to exact per-example gradients).
    ``run``: adds a zero probe to each use's output (its gradient is the output gradient g) and
    records the use's input (x, or the ids of an embedding).
    """

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights = weights
        self.phase = "discover"
        self.uses: list[_Use] = []
        self.other: set[str] = set()
        self.ghost: set[str] = set()
        self.probes: list = []
        self.inputs: list = []
        self.k = 0

    def _name(self, w) -> Optional[str]:
        return self.weights.get(id(w)) if isinstance(w, Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.embedding:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self._name(w)
            plain = func is F.linear or _plain_embedding(args, kwargs)
            if self.phase == "discover":
                # a params leaf in any other slot (the input of a linear, a bias) is a use that
                # the factors do not cover: that leaf takes the exact route
                if len(args) > 1:
                    rest = (args[:1] + args[2:], kwargs)
                else:
                    rest = (args, {k: v for k, v in kwargs.items() if k != "weight"})
                for leaf in pytree.tree_leaves(rest):
                    other = self._name(leaf)
                    if other is not None:
                        self.other.add(other)
            if name is not None:
                if self.phase == "discover":
                    out = func(*args, **kwargs)
                    if plain:
                        kind = "linear" if func is F.linear else "embedding"
                        self.uses.append(_Use(name, kind, tuple(out.shape), out.dtype))
                    else:
                        self.other.add(name)
                    return out
                if name in self.ghost:
                    return self._run(func, name, args, kwargs)
            return func(*args, **kwargs)
        if self.phase == "discover" and func not in _METADATA_FUNCS and getattr(func, "__name__", "") != "__get__":
            for leaf in pytree.tree_leaves((args, kwargs)):
                name = self._name(leaf)
                if name is not None:
                    self.other.add(name)
        return func(*args, **kwargs)

    def _run(self, func, name, args, kwargs):
        k = self.k
        use = self.ghost_uses[k] if k < len(self.ghost_uses) else None
        kind = "linear" if func is F.linear else "embedding"
        if use is None or use.name != name or use.kind != kind:
            raise _GhostMismatch(
                f"per-example control flow differs from the first example: use #{k} is {kind}({name!r}), "
                f"expected {use.kind + '(' + repr(use.name) + ')' if use else 'no further use'}; use method='vmap'"
            )
        out = func(*args, **kwargs)
        if tuple(out.shape) != use.shape:
            raise _GhostMismatch(
                f"{kind}({name!r}) output has shape {tuple(out.shape)} but {use.shape} for the first example; "
                "ghost clipping needs equally shaped examples (pad them), or use method='vmap'"
            )
        self.inputs.append(args[0] if args else kwargs["input"])
        self.k += 1
        return out + self.probes[k]


def _discover(loss_fn, params: Params, batch) -> _WatchLinear:
    flat = tree.flatten(params)
    candidates = {id(v): n for n, v in flat.items() if isinstance(v, Tensor) and v.dim() == 2 and v.is_floating_point()}
    mode = _WatchLinear(candidates)
    with torch.no_grad(), mode:
        loss_fn(params, _slice(batch, 0, 1))
    names_used = {u.name for u in mode.uses}
    mode.ghost = names_used - mode.other
    mode.ghost_uses = [u for u in mode.uses if u.name in mode.ghost]
    return mode


def _gram(a, a_ids: bool, b, b_ids: bool) -> Tensor:
    """(B, Na, Nb) inner products of rows: dense (B, N, D) or one-hot given by ids (B, N)."""
    if a_ids and b_ids:
        return (a[:, :, None] == b[:, None, :]).float()
    if a_ids:  # onehot(a_t) · b_s = b_s[a_t]
        return torch.gather(b.float(), 2, a[:, None, :].expand(-1, b.shape[1], -1)).transpose(1, 2)
    if b_ids:
        return _gram(b, True, a, False).transpose(1, 2)
    return torch.bmm(a.float(), b.float().transpose(1, 2))


def _factors(use: _Use, x: Tensor, g: Tensor):
    """G = Σ_t L_t R_tᵀ for one use: (L, L_is_ids, R), each with shape (B, N, ·) / (B, N)."""
    B = g.shape[0]
    if use.kind == "linear":
        return g.reshape(B, -1, g.shape[-1]), False, x.reshape(B, -1, x.shape[-1])
    return x.reshape(B, -1), True, g.reshape(B, -1, g.shape[-1])


def _ghost_sq_norms(weight_uses: list, weight_shape) -> Tensor:
    """(B,) ‖Σ_k G_k‖² over the uses of one weight: Σ_{k,l} Σ_{t,s} (L_k·L_l)(R_k·R_l)."""
    total = None
    for i, (L1, ids1, R1) in enumerate(weight_uses):
        for j in range(i, len(weight_uses)):
            L2, ids2, R2 = weight_uses[j]
            n1 = R1.shape[1]
            out_dim, in_dim = weight_shape
            if i == j and not ids1 and n1 * n1 * (out_dim + in_dim) > n1 * out_dim * in_dim:
                # cheaper to form this use's per-example gradient once: (B, out, in)
                G = torch.bmm(L1.float().transpose(1, 2), R1.float())
                term = G.pow(2).sum((1, 2))
            else:
                term = (_gram(L1, ids1, L2, ids2) * _gram(R1, False, R2, False)).sum((1, 2))
                if i != j:
                    term = 2 * term
            total = term if total is None else total + term
    return total


def _ghost_weighted_grad(weight_uses: list, w: Tensor, shape, dtype) -> Tensor:
    """Σ_i w_i G_i for one weight: a matmul per linear use, an index_add per embedding use."""
    out = torch.zeros(shape, dtype=torch.float32, device=w.device)
    for L, ids, R in weight_uses:
        if ids:  # embedding: rows L (ids) receive w_i · R
            Rw = (R.float() * w[:, None, None]).reshape(-1, R.shape[-1])
            out.index_add_(0, L.reshape(-1), Rw)
        else:  # linear: Σ_i w_i Σ_t L_t R_tᵀ
            Lw = (L.float() * w[:, None, None]).reshape(-1, L.shape[-1])
            out.addmm_(Lw.t(), R.float().reshape(-1, R.shape[-1]))
    return out.to(dtype)


def _ghost_pass(loss_fn, params: Params, batch, mode: _WatchLinear):
    """One forward + one activation-only backward: per-example losses, exact per-example grads
    of the non-ghost params, and per weight the (L, R) factors of each use."""
    B = batch_size(batch)
    flat = tree.flatten(params)
    small = {n: v for n, v in flat.items() if n not in mode.ghost}
    big = {n: v for n, v in flat.items() if n in mode.ghost}
    small_b = {n: v.expand((B,) + tuple(v.shape)) for n, v in small.items()}
    device = next(iter(big.values())).device if big else None  # the probes live where the outputs do
    probes = [torch.zeros((), dtype=u.dtype, device=device).expand((B,) + u.shape) for u in mode.ghost_uses]
    per_one = _per_example(loss_fn)

    def one(small_p, probe_list, example):
        mode.phase, mode.probes, mode.inputs, mode.k = "run", probe_list, [], 0
        loss = per_one(tree.unflatten({n: small_p[n] if n in small_p else big[n] for n in flat}), example)
        if mode.k != len(mode.ghost_uses):
            raise _GhostMismatch(
                f"per-example control flow differs from the first example: {mode.k} linear/embedding uses, "
                f"expected {len(mode.ghost_uses)}; use method='vmap'"
            )
        return loss, list(mode.inputs)

    batched = vmap(one, in_dims=(0, 0, _in_dims(batch)), randomness=RANDOMNESS)

    def f(small_p, probe_list):
        loss, inputs = batched(small_p, probe_list, batch)
        return loss, inputs

    mode.phase = "run"
    with mode:
        loss, vjp_fn, inputs = vjp(f, small_b, probes, has_aux=True)
        # called once: retain_graph=False lets autograd free each saved activation as its node
        # runs (vjp_fn keeps the whole graph by default), which lowers the chunk's peak
        small_grads, probe_grads = vjp_fn(torch.ones_like(loss), retain_graph=False)
    mode.phase = "discover"
    uses: dict[str, list] = {}
    for use, x, g in zip(mode.ghost_uses, inputs, probe_grads):
        # x, g: (B, 1, ..., features); the per-example batch of one is dim 1
        uses.setdefault(use.name, []).append(_factors(use, x, g))
    return loss.detach(), small_grads, uses


def _ghost_norms_and_sum(loss_fn, params, batch, max_norm, chunk, want_sum):
    B = batch_size(batch)
    mode = _discover(loss_fn, params, batch)
    flat = tree.flatten(params)
    all_norms, all_losses, total = [], [], None
    for start, stop in _chunks(B, chunk):
        part = _slice(batch, start, stop)
        loss, small_grads, uses = _ghost_pass(loss_fn, params, part, mode)
        sq = torch.zeros(stop - start, device=loss.device)
        for g in small_grads.values():
            sq = sq + g.reshape(g.shape[0], -1).float().pow(2).sum(1)
        for name, factors in uses.items():
            sq = sq + _ghost_sq_norms(factors, tuple(flat[name].shape))
        n = sq.clamp(min=0).sqrt()
        all_norms.append(n)
        all_losses.append(loss)
        if want_sum:
            w = clip_factors(n, max_norm)
            part_sum = {name: _ghost_weighted_grad(f, w, flat[name].shape, flat[name].dtype) for name, f in uses.items()}
            part_sum.update({name: torch.tensordot(w.to(g.dtype), g, dims=1) for name, g in small_grads.items()})
            part_sum = tree.unflatten({n_: part_sum[n_] for n_ in flat})
            total = part_sum if total is None else tree.map(torch.add, total, part_sum)
    return torch.cat(all_norms), torch.cat(all_losses), total


# ----------------------------------------------------------------------------- public: norms, clipped sum


def norms(loss_fn: Callable, params: Params, batch, *, chunk_size: Optional[int] = None, method: str = "ghost") -> Tensor:
    """(B,) per-example global L2 gradient norms ‖∇ loss_i‖, without keeping all per-example
    gradients (``"vmap"``: one chunk at a time; ``"ghost"``: none for linear/embedding weights)."""
    B = batch_size(batch)
    chunk = _check_chunk(chunk_size, B)
    _check_method(method)
    if B == 0:
        return torch.zeros(0)
    impl = _ghost_norms_and_sum if method == "ghost" else _vmap_norms_and_sum
    return impl(loss_fn, params, batch, math.inf, chunk, False)[0]


class Clipped(NamedTuple):
    """``sum``: Σ_i min(1, C/‖g_i‖) g_i (Params); ``norms``: (B,) ‖g_i‖ before clipping;
    ``losses``: (B,) per-example losses."""

    sum: Params
    norms: Tensor
    losses: Tensor


def clipped_sum(
    loss_fn: Callable,
    params: Params,
    batch,
    max_norm: float,
    *,
    chunk_size: Optional[int] = None,
    method: str = "ghost",
) -> Clipped:
    """The DP-SGD aggregate Σ_i clip_C(g_i), clip_C(g) = g · min(1, C/(‖g‖ + 1e-6)).

    An empty batch gives a zero sum (a Poisson-sampled batch may be empty).
    """
    max_norm = _check_max_norm(max_norm)
    B = batch_size(batch)
    chunk = _check_chunk(chunk_size, B)
    _check_method(method)
    if B == 0:
        return Clipped(tree.zeros_like(params), torch.zeros(0), torch.zeros(0))
    impl = _ghost_norms_and_sum if method == "ghost" else _vmap_norms_and_sum
    n, l, total = impl(loss_fn, params, batch, max_norm, chunk, True)
    return Clipped(total, n, l)


# ----------------------------------------------------------------------------- curvature and attribution


def hvp(loss_fn: Callable, params: Params, batch, vector: Params) -> Params:
    """Hessian-vector product H v of ``loss_fn(·, batch)`` at ``params``, forward-over-reverse:
    ``jvp(grad(loss))`` costs about two gradients and never forms H."""
    tree.check_structure(params, vector, what="hvp vector")
    return jvp(lambda p: grad(loss_fn)(p, batch), (params,), (vector,))[1]


def _flat_grads(g: Params) -> Tensor:
    return torch.cat([x.reshape(x.shape[0], -1) for x in tree.leaves(g)], dim=1)


def grad_dots(
    loss_fn: Callable, params: Params, batch_a, batch_b=None, *, chunk_size: Optional[int] = None
) -> Tensor:
    """(Na, Nb) matrix ⟨∇loss(a_i), ∇loss(b_j)⟩ of per-example gradient inner products
    (``batch_b=None``: a against itself). ``batch_b``'s gradients are held flat (Nb, P); ``a`` is
    processed ``chunk_size`` examples at a time."""
    Na = batch_size(batch_a)
    chunk = _check_chunk(chunk_size, Na)
    if batch_b is None:
        gb = _flat_grads(grads(loss_fn, params, batch_a, chunk_size=chunk_size))
        return gb @ gb.t()
    gb = _flat_grads(grads(loss_fn, params, batch_b, chunk_size=chunk_size))
    rows = [_flat_grads(grads(loss_fn, params, _slice(batch_a, s, e))) @ gb.t() for s, e in _chunks(Na, chunk)]
    return torch.cat(rows)


def tracin(
    loss_fn: Callable, checkpoints, train_batch, test_batch, *, chunk_size: Optional[int] = None
) -> Tensor:
    """TracIn-CP (Pruthi et al. 2020): influence of each training example on each test example,
    Σ_c η_c ⟨∇loss(train_i; θ_c), ∇loss(test_j; θ_c)⟩ over checkpoints ``[(params_c, η_c), ...]``.
    Returns (N_train, N_test)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("tracin needs at least one (params, learning_rate) checkpoint")
    total = None
    for params, lr in checkpoints:
        part = lr * grad_dots(loss_fn, params, train_batch, test_batch, chunk_size=chunk_size)
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------------- DP-SGD


def _check_sigma(noise_multiplier) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (noise_multiplier >= 0) or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def _check_expected(expected_batch_size) -> Optional[float]:
    if expected_batch_size is None:
        return None
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, (int, float)) or not (expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be a number > 0 or None, got {expected_batch_size!r}")
    return float(expected_batch_size)


def _noisy_mean(total: Params, B: int, max_norm: float, sigma: float, expected: Optional[float], generator) -> Params:
    """(Σ_i clip(g_i) + N(0, σ²C²)) / n, n = expected batch size (Poisson) or the actual one."""
    if expected is None and B == 0:
        raise ValueError("an empty batch needs expected_batch_size (Poisson sampling divides by q·N)")
    denom = expected if expected is not None else float(B)
    std = sigma * max_norm

    def one(x):
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x / denom

    return tree.map(one, total)


def dp_aggregate(
    max_norm: float, noise_multiplier: float, *, expected_batch_size: Optional[float] = None, seed: int = 0
):
    """DP-SGD's aggregation as a :class:`~aam_func.optim.GradientTransformation` (Optax's
    ``differentially_private_aggregate``): its input ``grads`` are *per-example* gradients
    (leaves (B, *shape), e.g. from :func:`grads`); its output is
    (Σ_i clip_C(g_i) + N(0, σ²C²·I)) / n, n = ``expected_batch_size`` or B. Chain an optimizer
    after it. The noise comes from a generator seeded by (``seed``, step count) held in the state,
    so the same state gives the same noise: the transform is pure.
    """
    from .optim import GradientTransformation

    max_norm = _check_max_norm(max_norm)
    sigma = _check_sigma(noise_multiplier)
    expected = _check_expected(expected_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")

    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64), "seed": torch.tensor(seed, dtype=torch.int64)}

    def update(grads, state, params=None):
        B = {x.shape[0] for x in tree.leaves(grads)}
        if len(B) != 1:
            raise ValueError(f"dp_aggregate needs per-example grads with one leading batch size, got sizes {sorted(B)}")
        B = B.pop()
        count = int(state["count"])
        leaves = tree.leaves(grads)
        device = leaves[0].device if leaves else torch.device("cpu")  # the noise is drawn where the grads live
        g = torch.Generator(device=device).manual_seed(hash((int(state["seed"]), count)) & ((1 << 63) - 1))
        total = _weighted_sum(clip_factors(global_norms(grads), max_norm), grads) if B else tree.map(lambda x: x.sum(0), grads)
        out = _noisy_mean(total, B, max_norm, sigma, expected, g)
        return out, {"count": state["count"] + 1, "seed": state["seed"]}

    return GradientTransformation(init, update)


class DPInfo(NamedTuple):
    loss: Tensor  # mean per-example loss over the batch (nan for an empty batch)
    norms: Tensor  # (B,) per-example gradient norms before clipping
    batch_size: int


def dp_sgd(
    loss_fn: Callable,
    optimizer,
    *,
    max_norm: float,
    noise_multiplier: float,
    expected_batch_size: Optional[float] = None,
    method: str = "ghost",
    chunk_size: Optional[int] = None,
):
    """A DP-SGD train step (Abadi et al. 2016) around any optimizer:

        step(params, opt_state, batch, generator) -> (params, opt_state, DPInfo)

    g̃ = (Σ_i clip_C(∇loss_i) + N(0, σ²C²)) / n, then ``optimizer.update(g̃, ...)``. With Poisson
    sampling (:func:`poisson_sample`) pass ``expected_batch_size = q·N``: the batch size varies,
    may be 0, and the divisor must not depend on it. The per-example gradients are never
    materialised with ``method="ghost"``. Account the privacy with
    :func:`aam_func.privacy.epsilon` (steps, q, σ, δ).
    """
    from .optim import apply_updates

    max_norm = _check_max_norm(max_norm)
    sigma = _check_sigma(noise_multiplier)
    expected = _check_expected(expected_batch_size)
    _check_method(method)

    def step(params, opt_state, batch, generator: Optional[torch.Generator] = None):
        if sigma > 0 and generator is None:
            raise ValueError("dp_sgd's step needs an explicit torch.Generator for the noise (generator=...)")
        B = batch_size(batch)
        res = clipped_sum(loss_fn, params, batch, max_norm, chunk_size=chunk_size, method=method)
        noisy = _noisy_mean(res.sum, B, max_norm, sigma, expected, generator)
        updates, opt_state = optimizer.update(noisy, opt_state, params)
        params = apply_updates(params, updates)
        loss = res.losses.mean() if B else torch.tensor(float("nan"))
        return params, opt_state, DPInfo(loss, res.norms, B)

    return step


def poisson_sample(n: int, sample_rate: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of a Poisson-sampled batch: each of ``n`` examples joins independently with
    probability ``sample_rate`` (the sampling the RDP accountant assumes). May be empty."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten()
