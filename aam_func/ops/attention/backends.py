"""Which path runs one attention call: the backend names and the one table that decides.

:func:`call_facts` reads what the choice depends on (the backend asked, device, dtypes,
autocast, gradient, forward-AD, vmap and compile state, the kinds of mask and bias) into a
:class:`CallFacts`; :func:`choose_path` maps those facts to a :class:`Route`, a row at a time.
The paths themselves live in :mod:`.dense` (``math``, ``dense_bias``, ``sdpa``, ``xformers``)
and :mod:`.kernel` (``blockwise``). ``tests/test_attention_backends.py`` pins the route of every
case the table distinguishes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...checks import is_int
from .._util import forward_ad_active, vmap_active

__all__ = ["BACKENDS", "MOD_BACKENDS", "PATHS", "DENSE_MODS_MAX_LEN", "CallFacts", "Route", "call_facts", "choose_path", "check_q_offset"]

BACKENDS = ("auto", "math", "sdpa", "blockwise", "xformers", "triton")  # what a caller (or a config) may ask for
MOD_BACKENDS = ("auto", "math", "blockwise")  # the backends that run a score_mod / mask_mod / block_mask
PATHS = ("sdpa", "math", "dense_bias", "blockwise", "xformers", "triton", "flex")  # what actually runs

_TRITON = importlib.util.find_spec("triton") is not None  # read once: call_facts runs under dynamo
# whether auto may take the Triton kernels on CUDA: not before a device has run them
TRITON_AUTO = False
# the longest key length at which ``auto`` runs a mask-only mod on the CPU as SDPA with the
# whole dense bool mask: it reads every tile, so the blockwise kernel's tile skipping wins beyond
# (fwd + bwd, fp32, one thread, a document mask with 2 documents per row: SDPA 48 vs blockwise
# 131 ms at T 256, 88 vs 129 at 512, 164 vs 173 at 1024, 327 vs 246 at 2048; docs/attention.md)
DENSE_MODS_MAX_LEN = 512
TRITON_DROPOUT_FALLBACK = "backend='triton' has no attention dropout; calls with dropout_p > 0 run on the dense math path"
DROPOUT_FALLBACK = "backend='blockwise' has no attention dropout; calls with dropout_p > 0 run on the dense math path"


@dataclass(frozen=True)
class CallFacts:
    """Everything :func:`choose_path` reads about one call."""

    backend: str  # one of BACKENDS
    device: str  # q.device.type
    same_dtype: bool  # q, k and v share one dtype
    cpu_bf16_grad: bool  # CPU bf16 autocast while a gradient is taken (see call_facts)
    compiling: bool  # torch.compile is tracing the call
    forward_ad: bool  # forward-mode AD is active (read in eager only: dynamo cannot trace it)
    vmap: bool  # inside torch.func.vmap (read in eager only)
    q_offset: bool  # a static-cache query position was given
    relative_bias: bool
    dropout: bool  # dropout_p > 0
    padding: bool  # a key_padding_mask was given
    window: bool
    sparsity: bool
    causal: bool
    q_len: int
    k_len: int
    triton: bool = False  # a CUDA call with the triton package installed (ops/attention/triton)
    mods: bool = False  # a score_mod, mask_mod or block_mask was given (issue 20)
    flex_available: bool = False  # torch.nn.attention.flex_attention imports
    mask_only: bool = False  # the mods are a mask_mod / block_mask alone (no score_mod)


class Route(NamedTuple):
    """The path that runs (one of PATHS) and a warning to give the caller, if any."""

    path: str
    warning: Optional[str] = None


def _cpu_bf16_autocast_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True under CPU bf16 autocast while a gradient is taken: there SDPA's CPU backward is
    slow (fwd+bwd 18.4 ms vs 7.0 ms on the math path at (8, 8, 128, 32), one thread; in fp32
    SDPA wins, 9.0 vs 11.4 ms; docs/benchmarks.md), so ``auto`` takes a dense math path."""
    return (
        q.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def call_facts(q, k, v, *, backend, causal, key_padding_mask, window, sparsity, relative_bias, dropout_p,
               q_offset, mods: bool = False, mask_only: bool = False) -> CallFacts:
    """The facts of one (already validated) call, read from its arguments and the current state."""
    compiling = torch.compiler.is_compiling()
    return CallFacts(
        backend=backend,
        device=q.device.type,
        same_dtype=q.dtype == k.dtype == v.dtype,
        cpu_bf16_grad=_cpu_bf16_autocast_grad(q, k, v),
        compiling=compiling,
        forward_ad=not compiling and forward_ad_active(),
        vmap=not compiling and vmap_active(),
        q_offset=q_offset is not None,
        relative_bias=relative_bias is not None,
        dropout=dropout_p > 0.0,
        padding=key_padding_mask is not None,
        window=window is not None,
        sparsity=sparsity is not None,
        causal=bool(causal),
        q_len=q.shape[2],
        k_len=k.shape[2],
        triton=_TRITON and q.device.type == "cuda",
        mods=mods,
        flex_available=mods and q.device.type == "cuda" and _flex_available(),
        mask_only=mask_only,
    )


def choose_path(f: CallFacts) -> Route:
    """The path a call takes: the first row that matches decides. Raises ValueError when the
    backend asked cannot run the call. (``q_offset`` with 'blockwise' or 'xformers' never gets
    here: :func:`check_q_offset` refuses it with the other argument checks.)"""
    # SDPA takes no relative bias, no dropout here (the math path owns dropout and its RNG), and
    # one dtype for q, k and v.
    sdpa_ok = not f.relative_bias and not f.dropout and f.same_dtype
    # SDPA's fused kernels run without a (Tq, Tk) mask: full attention, or causal where the
    # triangle is SDPA's own (square) or empty (one query in the last position reads every key).
    mask_free = not (f.padding or f.window or f.sparsity) and (not f.causal or f.q_len in (f.k_len, 1))

    if f.mods and (f.backend in ("sdpa", "xformers", "triton") or f.q_offset):
        what = "q_offset" if f.q_offset else f"backend={f.backend!r}"
        raise ValueError(f"score_mod, mask_mod and block_mask run on backends 'auto', 'blockwise' and 'math', "
                         f"not with {what}")
    if f.backend == "sdpa":  # asked for: SDPA (with a dense bool mask where needed), or refuse
        if not sdpa_ok:
            why = ("relative_bias is set" if f.relative_bias else "dropout_p > 0" if f.dropout
                   else "q, k and v dtypes differ")
            raise ValueError(f"backend='sdpa' cannot run this call: {why}; use backend='blockwise', 'math' or 'auto'")
        return Route("sdpa")
    if f.backend == "triton":  # asked for: every mask, bias and q_offset; dropout only on math
        return Route("math", TRITON_DROPOUT_FALLBACK) if f.dropout else Route("triton")
    if f.q_offset:  # a static KV cache (backend 'math' or 'auto'): dense paths only
        # auto: SDPA with a dense mask, except while compiling (inductor fuses the math path's
        # mask, softmax and matmuls; a compiled decode step ran 7-13% faster, docs/benchmarks.md),
        # under forward AD (SDPA has none on CPU) and under CPU bf16 autocast with a gradient.
        if f.backend == "auto" and sdpa_ok and not (f.compiling or f.forward_ad or f.cpu_bf16_grad):
            return Route("sdpa")
        return Route("math")
    if f.backend == "xformers":  # asked for: standard attention only (masks refused by the path)
        if f.relative_bias or f.dropout:
            raise ValueError("backend='xformers' supports neither relative_bias nor dropout here; use 'blockwise' or 'math'")
        return Route("xformers")
    if f.backend == "math":
        return Route("math")
    if f.dropout:  # only the math path has dropout; asked for blockwise, say so
        return Route("math", DROPOUT_FALLBACK if f.backend == "blockwise" else None)
    if f.mods:  # score_mod / mask_mod / block_mask (dense paths refused them above)
        return _route_mods(f)
    if f.backend == "blockwise":
        return Route("blockwise")
    # backend == "auto" from here on.
    if f.cpu_bf16_grad:  # SDPA's CPU bf16 backward is slow: a dense path, additive-bias form
        return Route("dense_bias" if not (f.relative_bias or f.padding) else "math")
    # SDPA when it needs no mask, unless forward AD (SDPA has none on CPU) or vmap on CUDA (its
    # memory-efficient backward fails there: "LSE is not correctly aligned"). On the CPU, SDPA
    # under vmap loops per example (no batching rule) yet still beats the math path
    # (docs/benchmarks.md), so it stays.
    if sdpa_ok and mask_free and not f.forward_ad and not (f.vmap and f.device == "cuda"):
        return Route("sdpa")
    # everything else: exact, O(T) memory, every mask, forward AD. The Triton kernels serve this
    # row on CUDA only once a GPU run has checked and timed them (docs/gpu.md): until then
    # auto keeps the blockwise kernel and backend="triton" is asked for by name.
    return Route("triton" if f.triton and TRITON_AUTO else "blockwise")


def _route_mods(f: CallFacts) -> Route:
    """A call with mods (backend 'blockwise' or 'auto', no dropout): FlexAttention on CUDA when it
    can serve the call (it has no forward-mode AD and no vmap rule, takes no relative bias or key
    padding, and its own fused kernel needs the menu's masks folded into the mask_mod: only the
    square causal triangle is); on the CPU, a mask_mod alone at short lengths runs on a dense
    path with the whole bool mask, SDPA (or math under CPU bf16 autocast with a gradient, as
    without mods): at T ≤ DENSE_MODS_MAX_LEN reading every tile costs less than the kernel's
    tile loop (no forward AD, vmap or compile there, as for SDPA without mods);
    else the blockwise kernel, which serves every transform."""
    flex_ok = (f.flex_available and f.device == "cuda" and not (f.forward_ad or f.vmap or f.compiling)
               and not (f.relative_bias or f.padding or f.window or f.sparsity) and f.same_dtype
               and (not f.causal or f.q_len == f.k_len))
    if f.backend == "auto" and flex_ok:
        return Route("flex")
    dense_ok = (f.mask_only and f.device == "cpu" and f.k_len <= DENSE_MODS_MAX_LEN and f.same_dtype
                and not (f.forward_ad or f.vmap or f.compiling or f.relative_bias))
    if f.backend == "auto" and dense_ok:  # under CPU bf16 autocast with a gradient: math, as without mods
        return Route("math" if f.cpu_bf16_grad else "sdpa")
    return Route("blockwise")


def check_q_offset(q_offset, backend: str) -> None:
    """``q_offset`` is an int or a 0-d integer tensor, and only dense backends take it."""
    if q_offset is None:
        return
    if not (is_int(q_offset) or (isinstance(q_offset, Tensor) and q_offset.dim() == 0
                                 and not q_offset.is_floating_point())):
        raise TypeError(f"q_offset must be an int or a 0-d integer tensor, got {q_offset!r}")
    if backend in ("blockwise", "xformers"):
        raise ValueError(f"q_offset (a static KV cache) runs on backends 'math', 'sdpa' or 'auto', not {backend!r}")
