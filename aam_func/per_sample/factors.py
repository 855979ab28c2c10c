"""Per-example weight gradients kept as factors, G_i = Σ_t L_it R_itᵀ, and what the ghost route
computes from them without forming G_i: squared norms, clipped sums, or G_i written in place.

A use's factors are ``(L, L_is_ids, R)`` with shapes (B, N, ·), or (B, N) ids for L:

- ``F.linear``   (weight (out, in)):  L = g (output gradients), R = x (inputs)
- ``torch.addmm`` (weight (in, out)): L = x, R = g          (the transpose of the above)
- ``F.embedding`` (weight (V, d)):    L = onehot(ids) as ids, R = g, with the rows of g at
  ``padding_idx`` zeroed (that row receives no gradient)
- ``F.conv1d/2d`` (weight (out, C, *k), groups 1): L = g at each output position (B, L, out),
  R = the input's patches ``unfold(x)`` (B, L, C·∏k); the weight read as (out, C·∏k)

Biases and norm affine weights are not kept as factors: their per-example gradients are small
and exact from the same probed use (:func:`bias_grad`: the output gradient summed over the
positions; :func:`norm_weight_grad`: the normalised input, recomputed, times it, summed; a
group norm's both sums from GroupNorm's own kernels).

Derivation: ``proofs/per_sample.md`` §2-3b, ``proofs/ghost_modules.md`` (conv §1, biases and
norms §2 and §6).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["factors", "gram", "ghost_sq_norms", "ghost_weighted_grad", "write_factors", "matrix_shape", "patches",
           "feature_shape", "bias_grad", "norm_weight_grad", "norms_and_weighted_sum"]


def matrix_shape(shape) -> tuple[int, int]:
    """A weight's shape read as the matrix its uses multiply by: (out, in·∏kernel) for a conv."""
    return int(shape[0]), int(math.prod(shape[1:]))


def _pairs(v, nd: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def patches(x: Tensor, kernel: tuple, options: dict) -> Tensor:
    """(M, C·∏k, L) input patches of a conv (``F.unfold``) for x (M, C, *spatial), 1-D or 2-D,
    with the conv's stride, dilation and padding (ints, tuples, "valid" or "same").

    The M examples are unfolded as ONE input of M·C channels: a channel's patches depend on that
    channel alone, so the rows come out example-major, (m, c, kernel offset), the (M, C·∏k, L)
    layout as a view. One ``im2col`` over M·C channels instead of one per example (the CPU kernel
    loops over the batch): 0.5-0.66x the time on the CNN of ``benchmarks/per_sample_cnn.py``.
    Symmetric padding is left to ``F.unfold`` (no padded copy); asymmetric padding ("same" with an
    odd total d·(k-1)) is applied with ``F.pad`` first."""
    nd = len(kernel)
    stride, dilation = _pairs(options["stride"], nd), _pairs(options["dilation"], nd)
    padding = options["padding"]
    if padding == "valid":
        padding = 0
    if padding == "same":  # torch pads total d·(k-1), the extra one on the right
        sides = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        sides = [(p, p) for p in _pairs(padding, nd)]
    M, C = x.shape[0], x.shape[1]
    if M:  # (an empty batch stays as it is: F.unfold refuses zero channels, not zero examples)
        x = x.reshape(1, M * C, *x.shape[2:])
    if any(a != b for a, b in sides):
        x, sides = F.pad(x, [s for pair in reversed(sides) for s in pair]), [(0, 0)] * nd
    pad = tuple(a for a, _ in sides)
    if nd == 1:
        x, kernel, stride, dilation, pad = x.unsqueeze(2), (1,) + kernel, (1,) + stride, (1,) + dilation, (0,) + pad
    U = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)  # (1, M·C·∏k, L)
    return U.view(M, C * math.prod(kernel), U.shape[-1])


def factors(kind: str, x: Tensor, g: Tensor, padding_idx: Optional[int] = None, options: Optional[dict] = None,
            kernel: tuple = ()) -> tuple:
    """One use's (L, L_is_ids, R) from its input ``x`` and output gradient ``g`` (B, 1, ..., ·);
    a conv's ``options`` (stride, padding, dilation) and ``kernel`` size make its patches."""
    B = g.shape[0]
    if kind == "conv":
        nd = len(kernel)
        x = x.reshape(-1, *x.shape[-(nd + 1):])  # (B·n, C, *spatial): n = 1 for a batch of one
        U = patches(x, kernel, options)
        g = g.reshape(x.shape[0], g.shape[-(nd + 1)], -1)  # (B·n, out, L)
        return g.transpose(1, 2).reshape(B, -1, g.shape[1]), False, U.transpose(1, 2).reshape(B, -1, U.shape[1])
    g = g.reshape(B, -1, g.shape[-1])
    if kind == "embedding":
        ids = x.reshape(B, -1)
        if padding_idx is not None:
            g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, True, g
    x = x.reshape(B, -1, x.shape[-1])
    return (x, False, g) if kind == "addmm" else (g, False, x)


def _norm_shape(options: dict) -> tuple:
    ns = options["normalized_shape"]
    return (int(ns),) if isinstance(ns, int) else tuple(ns)


def feature_shape(use, out: Tensor) -> tuple:
    """The shape a bias of this recognised use (``aam_func.intercept.Use``) adds to its output
    ``out``: the output features of a linear / addmm, the output channels of a conv (dim
    -(nd+1)) or a group norm (dim 1), a layer norm's normalized_shape."""
    if use.kind == "layer_norm":
        return _norm_shape(use.options)
    if use.kind == "group_norm":
        return (int(out.shape[1]),)
    if use.kind == "conv":
        return (int(out.shape[-(use.weight.dim() - 1)]),)
    return (int(out.shape[-1]),)


def bias_grad(kind: str, x: Tensor, g: Tensor, options: dict, nd: int = 0) -> Tensor:
    """(B, *bias shape) per-example bias gradients of a use from its output gradient ``g``
    (B, ...): g summed over every position the bias is broadcast to (``nd``: a conv's spatial dims)."""
    B = g.shape[0]
    if kind == "layer_norm":
        ns = _norm_shape(options)
        return g.reshape(B, -1, *ns).sum(1)
    if kind == "group_norm":
        return g.reshape(B, g.shape[1], g.shape[2], -1).sum((1, 3))
    if kind == "conv":
        return g.reshape(B, -1, g.shape[g.dim() - nd - 1], math.prod(g.shape[g.dim() - nd:])).sum((1, 3))
    return g.reshape(B, -1, g.shape[-1]).sum(1)


def norm_weight_grad(kind: str, x: Tensor, g: Tensor, options: dict, with_bias: bool = False):
    """(B, *weight shape) per-example gradients of a norm's affine weight: the normalised input
    x̂ (recomputed from the kept input ``x`` (B, ...) with the use's groups / shape and eps) times
    the output gradient ``g``, summed over every position but the weight's own. ``with_bias``:
    ``(weight grads, bias grads)``, the bias's the output gradient summed the same way.

    A group norm's x̂ and both sums come from torch's own GroupNorm kernels over ONE input of M·C
    channels in M·G groups (M the examples, or rows, of ``x`` (B, n, C, *)): group (m, k) holds
    exactly the values of example m's group k, so its statistics, x̂, and the affine gradients
    "summed over the batch" of that single input are the per-(m, c) sums (proofs/ghost_modules.md
    §6). One statistics pass and one reduction kernel instead of a normalised copy, a product and
    two sums."""
    B = x.shape[0]
    if kind == "layer_norm":
        ns = _norm_shape(options)
        xh = F.layer_norm(x, ns, eps=options["eps"])
        w = (xh * g).reshape(B, -1, *ns).sum(1)
        return (w, bias_grad(kind, x, g, options)) if with_bias else w
    n, C = x.shape[1], x.shape[2]
    M, G = B * n, options["num_groups"]
    hw = math.prod(x.shape[3:])
    x1, g1 = x.reshape(1, M * C, hw), g.reshape(1, M * C, hw).to(x.dtype)
    _, mean, rstd = torch.native_group_norm(x1, None, None, 1, M * C, hw, M * G, options["eps"])
    ones = torch.ones(M * C, dtype=x.dtype, device=x.device)  # the kernel wants a weight; dγ does not use it
    _, dw, db = torch.ops.aten.native_group_norm_backward(g1, x1, mean, rstd, ones, 1, M * C, hw, M * G,
                                                          [False, True, True])
    w = dw.view(B, n, C).sum(1)
    return (w, db.view(B, n, C).sum(1)) if with_bias else w


def gram(a: Tensor, a_ids: bool, b: Tensor, b_ids: bool) -> Tensor:
    """(B, Na, Nb) inner products of rows: dense (B, N, D) or one-hot given by ids (B, N)."""
    if a_ids and b_ids:
        return (a[:, :, None] == b[:, None, :]).float()
    if a_ids:  # onehot(a_t) · b_s = b_s[a_t]
        return torch.gather(_acc(b), 2, a[:, None, :].expand(-1, b.shape[1], -1)).transpose(1, 2)
    if b_ids:
        return gram(b, True, a, False).transpose(1, 2)
    return torch.bmm(_acc(a), _acc(b).transpose(1, 2))


def _acc(x: Tensor) -> Tensor:
    """x in the accumulation dtype: float32 for half types, float64 kept (no silent downgrade)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ghost_sq_norms(weight_uses: list, weight_shape) -> Tensor:
    """(B,) ‖Σ_k G_k‖² over the uses of one weight: Σ_{k,l} Σ_{t,s} (L_k·L_l)(R_k·R_l)."""
    total = None
    for i, (L1, ids1, R1) in enumerate(weight_uses):
        for j in range(i, len(weight_uses)):
            L2, ids2, R2 = weight_uses[j]
            n1 = R1.shape[1]
            out_dim, in_dim = matrix_shape(weight_shape)
            if i == j and not ids1 and n1 * n1 * (out_dim + in_dim) > n1 * out_dim * in_dim:
                # cheaper to form this use's per-example gradient once: (B, out, in)
                G = torch.bmm(_acc(L1).transpose(1, 2), _acc(R1))
                term = G.pow(2).sum((1, 2))
            else:
                term = (gram(L1, ids1, L2, ids2) * gram(R1, False, R2, False)).sum((1, 2))
                if i != j:
                    term = 2 * term
            total = term if total is None else total + term
    return total


def ghost_weighted_grad(weight_uses: list, w: Tensor, shape, dtype) -> Tensor:
    """Σ_i w_i G_i for one weight: a matmul per linear use, an index_add per embedding use."""
    acc = torch.promote_types(dtype, torch.float32)
    out = torch.zeros(matrix_shape(shape), dtype=acc, device=w.device)
    w = w.to(acc)
    for L, ids, R in weight_uses:
        if ids:  # embedding: rows L (ids) receive w_i · R
            Rw = (R.to(acc) * w[:, None, None]).reshape(-1, R.shape[-1])
            out.index_add_(0, L.reshape(-1), Rw)
        else:  # linear: Σ_i w_i Σ_t L_t R_tᵀ
            Lw = (L.to(acc) * w[:, None, None]).reshape(-1, L.shape[-1])
            out.addmm_(Lw.t(), R.to(acc).reshape(-1, R.shape[-1]))
    return out.reshape(shape).to(dtype)


def write_factors(dst: Tensor, weight_uses: list) -> None:
    """dst (b, *weight shape) = Σ over one weight's uses of its per-example gradients: the
    linear uses first (the first one writes ``bmm(Lᵀ, R)`` over dst, so dst needs no zeroing; the
    others add with ``baddbmm_``), then the embedding uses' rows by ``index_add_`` (onto zeros if
    no linear use wrote first). For a tied embedding/LM head this is one bmm and one index_add,
    not a zero fill, an index_add and a (V, d) read-modify-write per example."""
    b, rows = dst.shape[0], dst.shape[1]
    dst = dst.view(b, *matrix_shape(dst.shape[1:]))  # a conv's (b, out, C, *k) as (b, out, C·∏k)
    written = False
    for L, ids, R in weight_uses:
        if ids:
            continue
        Lt, R = L.transpose(1, 2).to(dst.dtype), R.to(dst.dtype)
        if written:
            dst.baddbmm_(Lt, R)
        else:
            torch.bmm(Lt, R, out=dst)
            written = True
    for L, ids, R in weight_uses:
        if not ids:
            continue
        # embedding: example i's rows ids[i] receive its output gradients
        if not written:
            dst.zero_()
            written = True
        index = (L + torch.arange(b, device=L.device)[:, None] * rows).reshape(-1)
        dst.view(b * rows, -1).index_add_(0, index, R.reshape(-1, R.shape[-1]).to(dst.dtype))


def norms_and_weighted_sum(small: dict, uses: dict, params: dict, b: int, max_norm: float, want_sum: bool):
    """One chunk's (b,) float32 per-example norms ‖g_i‖ and, with ``want_sum``, Σ_i clip_C(g_i)
    per name (zeros for a name with no gradient), from the materialised per-example gradients
    ``small`` {name: (b, ...)} and the factor weights' ``uses`` {name: [factors]}: the ghost and
    the batched routes' shared arithmetic (``proofs/per_sample.md`` §3-3b)."""
    from .clip import clip_factors, squared_norms, weighted_sum

    device = next(iter(params.values())).device if params else None
    sq = squared_norms(small) if small else torch.zeros(b, device=device)
    for name, fs in uses.items():
        sq = sq + ghost_sq_norms(fs, tuple(params[name].shape))
    n = sq.clamp(min=0).sqrt().float()  # float32 norms on every route (clip.squared_norms)
    if not want_sum:
        return n, None
    w = clip_factors(n, max_norm)
    part = {name: ghost_weighted_grad(fs, w, params[name].shape, params[name].dtype) for name, fs in uses.items()}
    part.update({k: v.to(params[k].dtype) for k, v in weighted_sum(w, small).items()})
    for name, v in params.items():
        part.setdefault(name, torch.zeros_like(v))
    return n, part
