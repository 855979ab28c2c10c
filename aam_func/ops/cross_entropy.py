"""Fused LM-head cross-entropy: ``linear_cross_entropy(hidden, weight, targets)``.

Equals ``F.cross_entropy(F.linear(hidden, weight, bias), targets, ...)`` but walks the tokens in
chunks, so the (N, V) logits never exist whole (Wijmans et al. 2024, "Cut Your Losses"). For a
token with logits z (V,), target t, smoothing ε and z-loss weight λ:

    lse  = log Σ_j exp z_j
    loss = lse − (1−ε) z_t − (ε/V) Σ_j z_j + λ lse²
    ∂loss/∂z = (1 + 2λ lse) softmax(z) − (1−ε) onehot(t) − ε/V

Forward keeps only the row log-sum-exp (N,). Backward recomputes a chunk's logits, forms
``dz`` and accumulates ``grad_hidden = dz W`` and ``grad_W += dzᵀ h`` (proofs/cross_entropy.md).

When a gradient will be needed and the reduction is "mean" or "sum" (a scalar loss), the forward
already computes the gradient for a unit upstream gradient while each chunk's logits are at hand
(one logits matmul instead of two) and backward only scales it. That holds O(N·d + V·d) extra
memory (the size of the inputs) and is used only when exactly that is safe: eager autograd or a
single ``torch.func.grad`` level, no vmap, no forward-mode AD. Higher-order cases (create_graph,
``grad(grad(...))``, ``jvp(grad(...))``) take a differentiable chunked recomputation instead, so
double backward is correct rather than silently zero.

``ignore_index`` targets contribute nothing. ``reduction="mean"`` divides by the number of
non-ignored targets; with every target ignored (or an empty batch) the mean is 0 with zero
gradient, as ``aam_func.losses.lm_loss`` defines it (``F.cross_entropy`` gives NaN there).
``reduction="none"`` returns per-token losses shaped like ``targets`` (0 where ignored).
bf16/fp16 inputs: matmuls run in the input dtype; log-sum-exp, losses and the weight gradient
accumulate in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_choice, check_int, check_number
from ._util import higher_order_active, transforms_active, values_inspectable, vmap_active
from .registry import OpSpec, register

__all__ = ["linear_cross_entropy", "reference", "check_class_ids", "REDUCTIONS", "IGNORE_INDEX"]

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100  # the label that contributes no loss (PyTorch's and transformers' default)


def check_class_ids(name: str, ids: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX, *,
                    classes: str = "") -> None:
    """Every id in ``ids`` is a class in ``[0, num_classes)`` or ``ignore_index``; else a
    ValueError naming ``name`` and the first bad id. ``classes`` names the bound in the message
    (``"vocab_size"`` -> ``[0, vocab_size=V)``). Reading the values is a device sync, so it is
    skipped where they cannot be read (under vmap / torch.compile: ``_util.values_inspectable``)."""
    if values_inspectable() and ids.numel():
        bad = ids[(ids != ignore_index) & ((ids < 0) | (ids >= num_classes))]
        if bad.numel():
            bound = f"{classes}={num_classes}" if classes else f"{num_classes}"
            raise ValueError(f"{name} contains {int(bad[0])}, outside [0, {bound}) and not ignore_index={ignore_index}")
_CHUNK_ELEMENTS = 2**21  # default: a chunk's fp32 logits take ~8 MiB
_GROUP_ELEMENTS = 2**23  # bf16/fp16: gradient rows held for one weight-gradient matmul (~16 MiB)


def _default_chunk(n: int, v: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // max(v, 1)))


def _check(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (vocab, d), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., d) and weight (vocab, d) disagree on d: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a Tensor of shape (vocab,) = ({weight.shape[0]},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    check_number("label_smoothing", label_smoothing, min=0, max=1, max_open=True)
    check_number("z_loss", z_loss, min=0)
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("chunk_size", chunk_size, min=1, allow_none=True)
    check_int("ignore_index", ignore_index)
    check_class_ids("targets", targets, weight.shape[0], ignore_index, classes="vocab")


# ----------------------------------------------------------------------------- chunk math
def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(n, d) @ (V, d)ᵀ (+ b) in the input dtype, returned as float32 (float64 stays float64)."""
    z = F.linear(h, weight, bias)
    return z if z.dtype == torch.float64 else z.float()


def _onehot(t: Tensor, v: int, dtype) -> Tensor:
    return (torch.arange(v, device=t.device) == t[:, None]).to(dtype)  # broadcast: fine under vmap


def _token_grad(z: Tensor, lse: Tensor, t: Tensor, eps: float, zl: float) -> Tensor:
    """∂loss_i/∂z_i for a chunk, out of place: (1 + 2λ lse) p − (1−ε) onehot − ε/V."""
    V = z.shape[-1]
    p = torch.exp(z - lse[:, None])
    if zl:
        p = p * (1.0 + 2.0 * zl * lse)[:, None]
    G = p - (1.0 - eps) * _onehot(t, V, z.dtype)
    return G - eps / V if eps else G


def _token_loss(z: Tensor, t: Tensor, eps: float, zl: float) -> tuple[Tensor, Tensor]:
    """(loss, lse) per row of a chunk's logits z (n, V); t already made safe (ignored -> 0)."""
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - (1.0 - eps) * z.gather(1, t[:, None]).squeeze(1)
    if eps:
        loss = loss - (eps / z.shape[-1]) * z.sum(-1)
    if zl:
        loss = loss + zl * lse * lse
    return loss, lse


def _weights(valid: Tensor, reduction: str, dtype) -> Tensor:
    """Per-token weight of the reduced loss: 1/count (mean; count clamped at 1), 1 (sum, none), 0 if ignored."""
    w = valid.to(dtype)
    if reduction == "mean":
        w = w / valid.sum().clamp(min=1).to(dtype)
    return w


def _reduce(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / valid.sum().clamp(min=1).to(total.dtype) if reduction == "mean" else total


def _chunked_composite(h, weight, bias, t, valid, eps, zl, reduction, chunk):
    """The loss by chunks with plain differentiable ops (used for higher-order derivatives)."""
    losses = []
    for s in range(0, h.shape[0], chunk):
        z = _logits(h[s : s + chunk], weight, bias)
        losses.append(_token_loss(z, t[s : s + chunk], eps, zl)[0])
    per_token = torch.cat(losses) if losses else h.new_zeros(0, dtype=torch.float32)
    return _reduce(per_token, valid, reduction)


def _lowered(low, *tensors):
    """``tensors`` cast to the autocast dtype ``low`` (float32 ones only; None passes through)."""
    if low is None:
        return tensors
    return tuple(x.to(low) if x is not None and x.dtype == torch.float32 else x for x in tensors)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- the Function
@dataclass(frozen=True)
class _Options:
    """Everything static about one call (a non-tensor Function argument), decided in
    :func:`linear_cross_entropy` where the transform stack is the caller's."""

    eps: float  # label smoothing ε
    zl: float  # z-loss weight λ
    reduction: str
    chunk: int  # tokens per chunk
    precompute: bool  # the forward computes the gradient for a unit upstream gradient
    eager: bool  # no torch.func transform is active
    higher_order: bool  # a derivative of the gradient may be taken (_util.higher_order_active)
    low: Optional[torch.dtype]  # the autocast dtype float32 inputs are cast to, or None


def _loss_only(h, weight, bias, t, valid, o: _Options):
    """Forward without gradients: per-token loss and lse by chunks (out of place under vmap)."""
    N, acc = h.shape[0], _acc_dtype(h.dtype)
    lse = h.new_empty(N, dtype=acc)
    per_token = h.new_empty(N, dtype=acc)
    gh = gw = gb = h.new_empty(0)
    if vmap_active():  # out of place, batched
        pieces = [_token_loss(_logits(h[s : s + o.chunk], weight, bias), t[s : s + o.chunk], o.eps, o.zl)
                  for s in range(0, N, o.chunk)]
        if pieces:
            per_token = torch.cat([p[0] for p in pieces])
            lse = torch.cat([p[1] for p in pieces])
        return _reduce(per_token, valid, o.reduction), lse, gh, gw, gb
    for s in range(0, N, o.chunk):
        z = _logits(h[s : s + o.chunk], weight, bias)  # (n, V) fp32
        loss_c, lse_c = _token_loss(z, t[s : s + o.chunk], o.eps, o.zl)
        per_token[s : s + o.chunk] = loss_c
        lse[s : s + o.chunk] = lse_c
        del z  # free this chunk's logits before the next chunk allocates its own
    return _reduce(per_token, valid, o.reduction), lse, gh, gw, gb


def _chunk_loss_and_grad(z: Tensor, tc: Tensor, w_c: Tensor, eps: float, zl: float):
    """(G, loss, lse) of one chunk, with z's buffer turned into the weighted gradient in place:
    G = w · [(1 + 2λ lse) softmax(z) − (1−ε) onehot − ε/V], in as few passes as possible."""
    V = z.shape[-1]
    loss_c = -(1.0 - eps) * z.gather(1, tc[:, None]).squeeze(1)
    if eps:
        loss_c = loss_c - (eps / V) * z.sum(-1)
    # One pass of exp, in place in the chunk buffer: z -> exp(z - max) -> softmax.
    m = z.amax(-1)
    G = z.sub_(m[:, None]).exp_()
    total = G.sum(-1)
    lse_c = m + total.log()
    loss_c = loss_c + lse_c + (zl * lse_c * lse_c if zl else 0.0)
    scale = w_c / total
    if zl:
        scale = scale * (1.0 + 2.0 * zl * lse_c)
    G.mul_(scale[:, None])
    G[torch.arange(G.shape[0], device=G.device), tc] -= (1.0 - eps) * w_c
    if eps:
        G.sub_(((eps / V) * w_c)[:, None])
    return G, loss_c, lse_c


def _loss_and_grads(h, weight, bias, t, valid, o: _Options):
    """Forward that also computes the gradients for a unit upstream gradient (not under vmap:
    the in-place buffers are ours)."""
    N, V = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h.dtype)
    lse = h.new_empty(N, dtype=acc)
    per_token = h.new_empty(N, dtype=acc)
    w = _weights(valid, o.reduction, acc)
    gh = torch.empty_like(h)
    # low precision: the first group's matmul writes it whole (no zero pass)
    alloc = torch.empty if h.dtype != acc and N > 0 else torch.zeros
    gw = alloc(weight.shape, dtype=acc, device=weight.device)
    gb = torch.zeros(V, dtype=acc, device=weight.device) if bias is not None else h.new_empty(0)
    low = h.dtype != acc
    if low:
        # Low precision: each chunk's gradient rows are kept (in h's dtype) in a buffer of up
        # to _GROUP_ELEMENTS and the weight gradient takes one matmul per full buffer; a
        # matmul per chunk would round each chunk's partial sum to bf16 and spend a cast and an
        # add of a (V, d) tensor on it.
        group = max(o.chunk, min(N, _GROUP_ELEMENTS // max(V, 1)))
        if group < N:  # whole chunks only: a chunk must never straddle the buffer's end
            group = group // o.chunk * o.chunk
        gbuf = h.new_empty(min(group, N), V)
        g0 = 0  # first row held in gbuf
    for s in range(0, N, o.chunk):
        hc = h[s : s + o.chunk]
        z = _logits(hc, weight, bias)  # (n, V) fp32
        G, loss_c, lse_c = _chunk_loss_and_grad(z, t[s : s + o.chunk], w[s : s + o.chunk], o.eps, o.zl)
        per_token[s : s + o.chunk] = loss_c
        lse[s : s + o.chunk] = lse_c
        Gd = gbuf[s - g0 : s - g0 + G.shape[0]].copy_(G) if low else G
        torch.mm(Gd, weight, out=gh[s : s + o.chunk])
        if not low:
            gw.addmm_(G.t(), hc)
        elif s + G.shape[0] - g0 >= gbuf.shape[0] or s + G.shape[0] >= N:  # buffer full or last chunk
            rows = s + G.shape[0] - g0
            part = gbuf[:rows].t() @ h[g0 : g0 + rows]
            gw.copy_(part) if g0 == 0 else gw.add_(part)
            g0 += rows
        if bias is not None:
            gb.add_(G.sum(0))
        del G, Gd, z  # free this chunk's logits before the next chunk allocates its own
    return _reduce(per_token, valid, o.reduction), lse, gh, gw, gb


class _LinearCrossEntropy(torch.autograd.Function):
    """Outputs (loss, lse, grad_hidden, grad_weight, grad_bias); only loss is differentiable.

    The three gradient outputs are empty unless ``options.precompute`` (see the module docstring).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h, weight, bias, t, valid, options: _Options):
        h, weight, bias = _lowered(options.low, h, weight, bias)
        run = _loss_and_grads if options.precompute else _loss_only
        return run(h, weight, bias, t, valid, options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, bias, t, valid, options = inputs
        _, lse, gh, gw, gb = output
        ctx.mark_non_differentiable(lse, gh, gw, gb)
        # Otherwise autograd materialises zero cotangents shaped like gh and gw (N·d + V·d) at backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, weight, bias, t, valid, lse, gh, gw, gb)
        ctx.save_for_forward(h, weight, bias, t, valid, lse)
        ctx.options = options

    @staticmethod
    def backward(ctx, g, _g_lse, _gh, _gw, _gb):
        h, weight, bias, t, valid, lse, gh, gw, gb = ctx.saved_tensors
        o: _Options = ctx.options
        needs = ctx.needs_input_grad
        dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)  # of the inputs
        if g is None:  # only the loss is differentiable; no cotangent reached it
            g = torch.zeros((), dtype=lse.dtype, device=lse.device) if o.reduction != "none" else torch.zeros_like(lse)
        if o.higher_order or (o.eager and torch.is_grad_enabled()):
            # create_graph / nested transforms: a differentiable recomputation, chunk by chunk.
            fn = lambda h_, w_, b_: _chunked_composite(  # noqa: E731
                *_lowered(o.low, h_, w_, b_), t, valid, o.eps, o.zl, o.reduction, o.chunk
            )
            _, vjp_fn = torch.func.vjp(fn, h, weight, bias) if bias is not None else torch.func.vjp(
                lambda h_, w_: fn(h_, w_, None), h, weight
            )
            grads = vjp_fn(g)
            d_h, d_w = grads[0], grads[1]
            d_b = grads[2] if bias is not None else None
            return d_h, d_w, d_b, None, None, None
        # Below, nobody differentiates the gradient. Under torch.func.grad (which runs backward
        # with create_graph=True) detach, so that nothing is recorded; in eager grad mode is off here
        # (and the legacy vmap of gradcheck's batched-grad check has no rule for detach).
        if not o.eager:
            h, weight, g = h.detach(), weight.detach(), g.detach()
            bias = bias.detach() if bias is not None else None
        if o.precompute:
            d_h = (gh * g.to(gh.dtype)).to(dtypes[0]) if needs[0] else None
            d_w = (gw * g.to(gw.dtype)).to(dtypes[1]) if needs[1] else None
            d_b = (gb * g.to(gb.dtype)).to(dtypes[2]) if bias is not None and needs[2] else None
            return d_h, d_w, d_b, None, None, None
        d_h, d_w, d_b = _recomputed_grads(h, weight, bias, t, valid, lse, g, o)
        return (
            d_h.to(dtypes[0]) if needs[0] else None,
            d_w.to(dtypes[1]) if needs[1] else None,
            d_b.to(dtypes[2]) if bias is not None and needs[2] else None,
            None, None, None,
        )

    @staticmethod
    def jvp(ctx, dh, dw, db, _dt, _dvalid, _doptions):
        """d loss_i = Σ_j (∂loss_i/∂z_ij) dz_ij with dz = dh Wᵀ + h dWᵀ + db, chunk by chunk."""
        h, weight, bias, t, valid, lse = ctx.saved_tensors
        o: _Options = ctx.options
        h, weight, bias, dh, dw, db = _lowered(o.low, h, weight, bias, dh, dw, db)
        pieces = []
        for s in range(0, h.shape[0], o.chunk):
            hc = h[s : s + o.chunk]
            G = _token_grad(_logits(hc, weight, bias), lse[s : s + o.chunk], t[s : s + o.chunk], o.eps, o.zl)
            dz = 0
            if dh is not None:
                dz = dz + F.linear(dh[s : s + o.chunk], weight)
            if dw is not None:
                dz = dz + F.linear(hc, dw)
            if db is not None:
                dz = dz + db
            pieces.append((G * dz).sum(-1) if isinstance(dz, Tensor) else torch.zeros_like(lse[s : s + o.chunk]))
        per_token = torch.cat(pieces) if pieces else torch.zeros_like(lse)
        return _reduce(per_token.to(lse.dtype), valid, o.reduction), None, None, None, None


def _recomputed_grads(h, weight, bias, t, valid, lse, g, o: _Options):
    """(d_h, d_w, d_b) for upstream gradient g, recomputing each chunk's logits; out of place so
    the rule also runs under vmap. Returned in the accumulation dtypes."""
    h, weight, bias = _lowered(o.low, h, weight, bias)
    acc = lse.dtype
    w = _weights(valid, o.reduction, acc)
    scale = w * g.to(acc)  # (N,): g is a scalar, or per token for "none"
    d_hs, d_w, d_b = [], None, None
    for s in range(0, h.shape[0], o.chunk):
        hc = h[s : s + o.chunk]
        G = _token_grad(_logits(hc, weight, bias), lse[s : s + o.chunk], t[s : s + o.chunk], o.eps, o.zl)
        G = G * scale[s : s + o.chunk, None]
        Gd = G.to(h.dtype)
        d_hs.append(Gd @ weight)
        gw_c = (Gd.t() @ hc).to(acc)
        d_w = gw_c if d_w is None else d_w + gw_c
        if bias is not None:
            gb_c = G.sum(0)
            d_b = gb_c if d_b is None else d_b + gb_c
    d_h = torch.cat(d_hs) if d_hs else torch.zeros_like(h)
    if d_w is None:
        d_w = torch.zeros_like(weight)
        d_b = torch.zeros_like(bias) if bias is not None else None
    return d_h, d_w, d_b


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without materialising the logits.

    hidden (..., d), weight (V, d), targets (...) integer class ids. ``z_loss`` adds λ·lse² per
    token (PaLM's auxiliary loss). ``chunk_size`` tokens per chunk (default: ~2^21 logits, 8 MiB in
    float32, so that a chunk's softmax stays in cache).
    """
    _check(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    if torch.compiler.is_compiling() or torch._C._len_torch_function_stack() > 0:
        # Under torch.compile the composite is what inductor fuses best. Under a
        # TorchFunctionMode (LoRA's factored path, per-example ghost clipping) the mode must see
        # the head's F.linear and differentiate through it; the Function's hand-written backward
        # would bypass what the mode adds. Both get the plain, whole-logits composite.
        return _composite(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction)
    # Under autocast, autocast itself would cast the float32 weight at every chunk's matmul and
    # leave the gradient matmuls (on float32 buffers, which it does not touch) in float32. The
    # op instead casts float32 inputs once to the autocast dtype, as autocast does for F.linear,
    # and runs with autocast off: every matmul runs in that dtype; lse, losses and the weight
    # gradient accumulate in float32, and gradients come back in the inputs' dtypes.
    dev = hidden.device.type
    low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    V, d = weight.shape
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    chunk = chunk_size or _default_chunk(h.shape[0], V)
    # Decided here, where the transform stack is the caller's.
    higher = higher_order_active()
    options = _Options(
        eps=float(label_smoothing),
        zl=float(z_loss),
        reduction=reduction,
        chunk=chunk,
        precompute=reduction != "none" and _wants_grad(hidden, weight, bias) and not vmap_active() and not higher,
        eager=not transforms_active(),
        higher_order=higher,
        low=low,
    )
    with torch.autocast(dev, enabled=False) if low is not None else contextlib.nullcontext():
        out = _LinearCrossEntropy.apply(h, weight, bias, t_safe, valid, options)
    loss = out[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss


def reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """The composite twin: ``F.cross_entropy(F.linear(...))`` (+ z-loss), whole logits, same conventions."""
    _check(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    return _composite(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction)


def _composite(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction) -> Tensor:
    V, d = weight.shape
    z = _logits(hidden.reshape(-1, d), weight, bias)
    t = targets.reshape(-1)
    valid = t != ignore_index
    per_token = F.cross_entropy(z, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(z, -1).pow(2)
    out = _reduce(per_token, valid, reduction)
    return out.reshape(targets.shape) if reduction == "none" else out


def _samples() -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return [
        ((r(5, 3), r(7, 3), torch.tensor([0, 6, -100, 2, 3])), {"chunk_size": 2}),
        ((r(2, 3, 4), r(6, 4), torch.tensor([[1, 5, 0], [2, -100, 4]])), {"bias": r(6), "label_smoothing": 0.1, "z_loss": 0.01, "chunk_size": 4}),
        ((r(4, 3), r(5, 3), torch.tensor([0, 1, 4, -100])), {"reduction": "sum", "chunk_size": 3}),
        ((r(4, 3), r(5, 3), torch.tensor([0, 1, 4, -100])), {"reduction": "none", "label_smoothing": 0.2}),
    ]


register(OpSpec(name="linear_cross_entropy", function=_LinearCrossEntropy, op=linear_cross_entropy, reference=reference,
                proof="proofs/cross_entropy.md", samples=_samples, supports_forward_ad=True,
                supports_double_backward=True))
