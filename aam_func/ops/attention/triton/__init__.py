"""Triton attention: FlashAttention-2-style forward and backward kernels and a fused
forward-mode (jvp) kernel, with every variant of :func:`aam_func.ops.attention.attention`
(causal, key padding, local window, sparse patterns with empty tiles skipped, Shaw/T5/ALiBi
relative bias, GQA, a query offset), vmap folded into the launch grid.

``attention(..., backend="triton")`` runs it; ``auto`` picks it on CUDA where the blockwise
kernel would run (never on the CPU). On the CPU it runs under Triton's interpreter: exact but
slow, which is how CI tests it without a GPU. Needs the ``triton`` package (the ``gpu`` extra).

- :mod:`.kernels`: the ``@triton.jit`` kernels;
- :mod:`.launch`: their launches as torch custom ops (fake and vmap rules);
- :mod:`.function`: :class:`TritonAttention` (autograd.Function) and the host-side inputs.

Derivations: proofs/attention.md, "Triton kernels"; notes and (unmeasured) GPU figures:
docs/gpu.md.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ..dense import reference
from ..masks import RelativeBias, Sparsity

__all__ = ["available", "triton_attention", "attention_jvp", "TritonAttention"]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available() -> bool:
    """Whether the ``triton`` package is installed."""
    return importlib.util.find_spec("triton") is not None


def _require() -> None:
    if not available():
        raise ImportError("backend='triton' needs the 'triton' package: pip install 'aam_func[gpu]' (or pip install triton)")


def _inputs(q, k, v, kw):
    _require()
    from .function import prepare

    if q.dtype not in _SUPPORTED:
        raise TypeError(f"backend='triton' supports q dtypes {[str(d) for d in _SUPPORTED]}, got {q.dtype}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' runs on CUDA (or on the CPU under Triton's interpreter), got device {q.device}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    return prepare(q, k, v, **kw)


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
    window: Optional[int] = None, sparsity: Optional[Sparsity] = None, relative_bias: Optional[RelativeBias] = None,
    scale: Optional[float] = None, q_offset=None, block_q: Optional[int] = None, block_k: Optional[int] = None,
) -> Tensor:
    """The Triton backend alone (no dispatch, no argument checks); same semantics as
    :func:`aam_func.ops.attention.attention`. ``block_q``/``block_k``: tile sizes (powers of
    two; default 64 on CUDA, 16 on the CPU). A tensor ``q_offset`` is read once on the host."""
    from .function import TritonAttention, TritonAttentionCore

    kw = dict(causal=causal, key_padding_mask=key_padding_mask, window=window, sparsity=sparsity,
              relative_bias=relative_bias, scale=scale, q_offset=q_offset, block_m=block_q, block_n=block_k)
    fn = TritonAttentionCore if torch.compiler.is_compiling() else TritonAttention
    with torch.autocast(q.device.type, enabled=False):  # the kernels choose their own precision
        return fn.apply(*_inputs(q, k, v, kw))[0]


def attention_jvp(
    q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor], tv: Optional[Tensor], *,
    causal: bool = False, key_padding_mask: Optional[Tensor] = None, window: Optional[int] = None,
    sparsity: Optional[Sparsity] = None, relative_bias: Optional[RelativeBias] = None, scale: Optional[float] = None,
    q_offset=None, block_q: Optional[int] = None, block_k: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """(out, tangent of out) from tangents of q, k, v (None: zero) in one fused kernel pass:
    what ``torch.func.jvp`` of the op computes in two (the forward, then the Function's jvp).
    The relative bias is held fixed (its table's tangent is zero). Not differentiable."""
    from . import launch

    kw = dict(causal=causal, key_padding_mask=key_padding_mask, window=window, sparsity=sparsity,
              relative_bias=relative_bias, scale=scale, q_offset=q_offset, block_m=block_q, block_n=block_k)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q_, k_, v_, kpm, qe, rb, layout, tiles, cfg, sc = _inputs(q, k, v, kw)
        tqe = None
        if tq is not None and qe is not None:  # Shaw: the tangent of q Eᵀ is q̇ Eᵀ
            tqe = torch.matmul(tq.to(qe.dtype), relative_bias.table.to(qe.dtype).transpose(-1, -2))
        cast = lambda t: None if t is None else t.to(q.dtype)  # noqa: E731
        out, _, t_out, _ = launch.jvp(q_, k_, v_, kpm, qe, rb, layout, tiles, cast(tq), cast(tk), cast(tv), tqe, None,
                                      list(cfg), sc)
    return out, t_out


def __getattr__(name):
    if name == "TritonAttention":
        _require()
        from .function import TritonAttention

        return TritonAttention
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------------
# Registration (only where triton is installed). Under the interpreter every call costs tens of
# milliseconds per program and gradcheck makes hundreds of calls, so the registry gets two small
# (head_dim 1 and 2)
# samples that together cover every input kind (GQA, padding, window, ALiBi's bias vector; Shaw,
# a sparse pattern, q_offset); tests/test_attention_triton.py covers every variant over several tiles.
# ----------------------------------------------------------------------------------------------


def _op(q, k, v, table=None, *, kind=None, **kw):
    from ..kernel import _sample_bias

    tile = 4 if q.device.type == "cpu" else None  # CUDA's minimum tile is 16
    return triton_attention(q, k, v, relative_bias=_sample_bias(table, kind, kw), block_q=tile, block_k=tile, **kw)


def _samples() -> list:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    kpm = torch.tensor([[True, False, True, True]])
    return [
        ((r(1, 2, 3, 1), r(1, 1, 4, 1), r(1, 1, 4, 1), r(2).abs().detach().requires_grad_()),
         dict(causal=True, key_padding_mask=kpm, window=3, kind="alibi")),
        ((r(1, 1, 3, 2), r(1, 1, 4, 2), r(1, 1, 4, 2), r(3, 2)),
         dict(causal=False, sparsity=Sparsity("strided", stride=2), q_offset=1, kind="shaw", max_distance=1)),
    ]


def _register() -> None:
    from ...registry import OpSpec, register
    from ..kernel import _ref
    from .function import TritonAttention

    register(OpSpec(name="attention_triton", function=TritonAttention, op=_op, reference=_ref,
                    proof="proofs/attention.md", samples=_samples, supports_forward_ad=True,
                    supports_double_backward=True))


if available():
    _register()
