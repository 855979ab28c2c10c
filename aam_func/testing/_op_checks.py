"""The individual checks of :func:`aam_func.testing.check_op`, one function per check.

Each takes ``(case, result, opt)``, compares the op with its reference on one sample and
raises (a :class:`~aam_func.testing._cases.Mismatch` or whatever the op raised) on failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch.func import grad, jvp, vmap

from ._cases import Case, Mismatch, compare, tensors

__all__ = ["Options", "CHECKS"]


@dataclass
class Options:
    rtol: float
    atol: float
    bf16_rtol: float
    bf16_atol: float
    compile_backend: str
    supports_forward_ad: bool
    supports_double_backward: Optional[bool]
    seed: int

    def gen(self, case: Case) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1000 * case.index)


def _cotangents(case: Case, opt: Options):
    g = opt.gen(case)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in tensors(case.bind(case.op)(*case.xs))]


def _grads(outs, xs, cots):
    pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    if not pairs:
        return [None] * len(xs)
    return torch.autograd.grad([o for o, _ in pairs], xs, [c for _, c in pairs], allow_unused=True)


def _values_and_grads(case: Case, res, opt: Options, op_xs, ref_xs, what: str, rtol=None, atol=None):
    """op(op_xs) vs reference(ref_xs): outputs, then vector-Jacobian products."""
    rtol, atol = opt.rtol if rtol is None else rtol, opt.atol if atol is None else atol
    out_op, out_ref = tensors(case.bind(case.op)(*op_xs)), tensors(case.bind(case.reference)(*ref_xs))
    compare(res, out_op, out_ref, rtol, atol, f"{what} output")
    cots = _cotangents(case, opt)
    compare(res, _grads(out_op, op_xs, cots), _grads(out_ref, ref_xs, cots), rtol, atol, f"{what} grad")


def check_values(case, res, opt):
    op, ref = case.bind(case.op), case.bind(case.reference)
    compare(res, tensors(op(*case.xs)), tensors(ref(*case.xs)), opt.rtol, opt.atol, "output")


def check_grads(case, res, opt):
    cots = _cotangents(case, opt)
    g_op = _grads(tensors(case.bind(case.op)(*case.xs)), case.xs, cots)
    g_ref = _grads(tensors(case.bind(case.reference)(*case.xs)), case.xs, cots)
    compare(res, g_op, g_ref, opt.rtol, opt.atol, "grad")


def _short(e: BaseException, lines: int = 4) -> str:
    text = str(e).strip().splitlines()
    return "\n".join(text[:lines]) + (" ..." if len(text) > lines else "")


def check_gradcheck(case, res, opt):
    xs = tuple(x.detach().double().requires_grad_() for x in case.xs)
    torch.autograd.gradcheck(case.bind(case.op), xs, check_forward_ad=opt.supports_forward_ad, check_batched_grad=True)


_CLEAR = re.compile(r"(?i)double backward|differentiate twice|twice|not supported|once_differentiable")


def check_gradgradcheck(case, res, opt):
    xs = tuple(x.detach().double().requires_grad_() for x in case.xs)
    op = case.bind(case.op)
    if opt.supports_double_backward:
        torch.autograd.gradgradcheck(op, xs)
        return
    try:
        out = tensors(op(*xs))
        gs = torch.autograd.grad(sum((o * o).sum() for o in out), xs, create_graph=True, allow_unused=True)
        total = sum(g.sum() for g in gs if g is not None)
        if not (isinstance(total, torch.Tensor) and total.requires_grad):
            raise Mismatch("first-order grads carry no graph, so double backward fails obscurely; "
                           "mark the backward @once_differentiable or raise a clear error")
        if opt.supports_double_backward is None:  # not declared: double backward ran, so check it
            torch.autograd.gradgradcheck(op, xs)
            return
        torch.autograd.grad(total, xs, allow_unused=True)
    except RuntimeError as e:
        if not _CLEAR.search(str(e)):
            raise
        res.notes[:] = ["double backward not supported (clear error: " + _short(e, 1) + ")"]
        return
    raise Mismatch("double backward ran although the op declares supports_double_backward=False; "
                   "declare it True so gradgradcheck checks it")


def check_jvp(case, res, opt):
    g = opt.gen(case)
    ts = tuple(torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) for x in case.xs)
    p_op, t_op = jvp(case.bind(case.op), case.xs, ts)
    p_ref, t_ref = jvp(case.bind(case.reference), case.xs, ts)
    compare(res, tensors(p_op), tensors(p_ref), opt.rtol, opt.atol, "jvp primal")
    compare(res, tensors(t_op), tensors(t_ref), opt.rtol, opt.atol, "jvp tangent")


def _stack_outputs(outs):
    return tuple(torch.stack(col) for col in zip(*[tensors(o) for o in outs]))


def check_vmap(case, res, opt):
    g = opt.gen(case)
    batched = [case.perturbed(x, (2,), g) for x in case.xs]
    got = tensors(vmap(case.bind(case.op))(*batched))
    want = _stack_outputs([case.bind(case.reference)(*[b[i] for b in batched]) for i in range(2)])
    compare(res, got, want, opt.rtol, opt.atol, "vmap output")


def check_vmap_in_dims(case, res, opt):
    """First input batched along its last dim (in_dims = ndim), the others unbatched (None)."""
    g = opt.gen(case)
    x0 = case.perturbed(case.xs[0], (3,), g)
    moved = x0.movedim(0, -1)
    in_dims = (moved.dim() - 1,) + (None,) * (len(case.xs) - 1)
    got = tensors(vmap(case.bind(case.op), in_dims=in_dims)(moved, *case.xs[1:]))
    want = _stack_outputs([case.bind(case.reference)(x0[i], *case.xs[1:]) for i in range(3)])
    compare(res, got, want, opt.rtol, opt.atol, f"vmap(in_dims={in_dims}) output")


def check_vmap_nested(case, res, opt):
    g = opt.gen(case)
    batched = [case.perturbed(x, (2, 2), g) for x in case.xs]
    got = tensors(vmap(vmap(case.bind(case.op)))(*batched))
    rows = [_stack_outputs([case.bind(case.reference)(*[b[i, j] for b in batched]) for j in range(2)]) for i in range(2)]
    compare(res, got, tuple(torch.stack(col) for col in zip(*rows)), opt.rtol, opt.atol, "vmap(vmap) output")


def check_vmap_grad(case, res, opt):
    g = opt.gen(case)
    batched = [case.perturbed(x, (2,), g) for x in case.xs]
    cots = _cotangents(case, opt)
    argnums = tuple(range(len(case.xs)))
    got = vmap(grad(case.loss(case.op, cots), argnums=argnums))(*batched)
    loops = [grad(case.loss(case.reference, cots), argnums=argnums)(*[b[i] for b in batched]) for i in range(2)]
    compare(res, got, [torch.stack(col) for col in zip(*loops)], opt.rtol, opt.atol, "vmap(grad)")


def check_vmap_jvp(case, res, opt):
    g = opt.gen(case)
    batched = [case.perturbed(x, (2,), g) for x in case.xs]
    tangents = [torch.randn(b.shape, generator=g, dtype=b.dtype).to(b.device) for b in batched]
    n = len(case.xs)

    def tangent_of(fn):
        return lambda *xt: tensors(jvp(case.bind(fn), tuple(xt[:n]), tuple(xt[n:]))[1])

    got = vmap(tangent_of(case.op))(*batched, *tangents)
    loops = [tangent_of(case.reference)(*[b[i] for b in batched], *[t[i] for t in tangents]) for i in range(2)]
    compare(res, got, [torch.stack(col) for col in zip(*loops)], opt.rtol, opt.atol, "vmap(jvp) tangent")


def _non_contiguous(x):
    """The same values in a strided view (every other element of a wider buffer)."""
    buf = torch.zeros(tuple(x.shape) + (2,), dtype=x.dtype, device=x.device)
    buf[..., 0] = x.detach()
    return buf.requires_grad_()[..., 0]


def check_noncontiguous(case, res, opt):
    xs = [_non_contiguous(x) for x in case.xs]
    if all(x.is_contiguous() for x in xs):
        res.notes[:] = ["every input has at most one element: nothing non-contiguous to try"]
    _values_and_grads(case, res, opt, xs, case.xs, "non-contiguous")


def _broadcast(x):
    """A stride-0 view: x's first slice along its first dim longer than 1, expanded back."""
    for d, n in enumerate(x.shape):
        if n > 1:
            base = x.detach().narrow(d, 0, 1).clone().requires_grad_()
            return base.expand(x.shape)
    return x


def check_broadcast(case, res, opt):
    xs = [_broadcast(x) for x in case.xs]
    if all(x is y for x, y in zip(xs, case.xs)):
        res.notes[:] = ["no input has a dimension longer than 1: nothing to broadcast"]
    _values_and_grads(case, res, opt, xs, xs, "broadcast (expanded) input")


def _cast_floats(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.detach().to(dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def check_autocast_bf16(case, res, opt):
    args32, kwargs32 = _cast_floats(case.args, torch.float32), _cast_floats(case.kwargs, torch.float32)
    xs32 = [args32[i] for i in case.diff]
    device = case.xs[0].device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        got = tensors(case.bind(case.op, args32, kwargs32)(*xs32))
    want = tensors(case.bind(case.reference)(*case.xs))
    compare(res, got, want, opt.bf16_rtol, opt.bf16_atol, "autocast(bf16) output")


def _compiled(fn, res, opt):
    """``torch.compile(fn, fullgraph=True)``; on a graph break, note it and compile without."""
    import torch._dynamo

    def run(*xs):
        torch._dynamo.reset()
        try:
            return torch.compile(fn, backend=opt.compile_backend, fullgraph=True)(*xs)
        except Exception as e:  # noqa: BLE001 - any fullgraph failure is reported as a break
            res.notes.append("graph break (fullgraph=True failed): " + _short(e, 2))
            torch._dynamo.reset()
            return torch.compile(fn, backend=opt.compile_backend)(*xs)

    return run


def check_compile(case, res, opt):
    rtol, atol = max(opt.rtol, 1e-6), max(opt.atol, 1e-6)
    got = tensors(_compiled(case.bind(case.op), res, opt)(*case.xs))
    compare(res, got, tensors(case.bind(case.reference)(*case.xs)), rtol, atol, "compiled output")


def check_compile_grad(case, res, opt):
    rtol, atol = max(opt.rtol, 1e-6), max(opt.atol, 1e-6)
    cots = _cotangents(case, opt)
    argnums = tuple(range(len(case.xs)))
    got = _compiled(grad(case.loss(case.op, cots), argnums=argnums), res, opt)(*case.xs)
    want = grad(case.loss(case.reference, cots), argnums=argnums)(*case.xs)
    try:
        compare(res, got, want, rtol, atol, "compiled grad")
    except Mismatch as e:
        if _compile_drops_custom_backward(opt.compile_backend):
            raise Mismatch(f"{e}; {_DROPPED_BACKWARD}") from None
        raise


_DROPPED_BACKWARD = (
    "this torch's compile(grad(f)) drops the custom backward of an autograd.Function and "
    "differentiates its forward instead (pytorch/pytorch#193279; a canary Function with "
    "backward 2g shows it), so the compiled gradient is the forward's autograd, not the op's rule")


class _TwiceBackward(torch.autograd.Function):
    """Identity whose backward (deliberately) doubles: the canary of :func:`_compile_drops_custom_backward`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _compile_drops_custom_backward(backend: str) -> bool:
    """True when ``torch.compile(grad(f))`` ignores an autograd.Function's own backward here."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        g = torch.compile(grad(lambda x: _TwiceBackward.apply(x).sum()), backend=backend)(torch.ones(2))
    finally:
        torch._dynamo.reset()
    return not torch.equal(g, torch.full((2,), 2.0))


CHECKS = {
    "values": check_values,
    "grads": check_grads,
    "gradcheck": check_gradcheck,
    "gradgradcheck": check_gradgradcheck,
    "jvp": check_jvp,
    "vmap": check_vmap,
    "vmap_in_dims": check_vmap_in_dims,
    "vmap_nested": check_vmap_nested,
    "vmap_grad": check_vmap_grad,
    "vmap_jvp": check_vmap_jvp,
    "noncontiguous": check_noncontiguous,
    "broadcast": check_broadcast,
    "autocast_bf16": check_autocast_bf16,
    "compile": check_compile,
    "compile_grad": check_compile_grad,
}
