"""Programmable attention: ``score_mod`` and ``mask_mod`` with FlexAttention's signatures.

- ``score_mod(score, b, h, q_idx, kv_idx) -> score``: rewrites each scaled logit (after the
  relative bias of :mod:`.masks`, before any mask);
- ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True where query ``q_idx`` may read key ``kv_idx``.

``b``, ``h``, ``q_idx`` and ``kv_idx`` are integer tensors; ``q_idx`` runs over 0 .. q_len − 1
and ``kv_idx`` over 0 .. kv_len − 1 (the raw indices, as in FlexAttention: the bottom-right
alignment of ``causal=True`` is the menu's, not the mods'). A mod is written for one element
and must be elementwise (no Python branching on values, no reductions): the kernels call it
once per tile on broadcastable index tensors, ``b`` (B, 1, 1, 1, 1), ``h`` (1, G, R, 1, 1),
``q_idx`` (…, bq, 1) and ``kv_idx`` (…, 1, bk), so indexing a captured table, ``torch.where``
and arithmetic all work as they do under FlexAttention's per-element vmap.

Tensors a mod *captures* (closure variables, ``functools.partial`` arguments, attributes of a
callable object, recursively through nested mods) are found by :func:`captured_tensors` and
become inputs of the blockwise kernel, so a learned table in a closure gets its gradient,
tangent and batching; inside the kernel the mod runs on the kernel's copies of them
(:func:`rebind`). A tensor read from a module's globals is not found: a global tensor that
requires grad is refused with an error rather than losing its gradient.

The predefined mods re-express the fixed menu (causal, window, strided/fixed sparsity, key
padding, ALiBi, T5 buckets) and add document masking, prefix-LM, sinks and soft-capping.
Derivations: proofs/attention.md §9.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Optional

import torch
from torch import Tensor

from .masks import t5_bucket, table_lookup

__all__ = [
    "check_score_mod", "check_mask_mod", "captured_tensors", "rebind", "and_masks", "or_masks",
    "causal_mask", "sliding_window", "strided", "fixed", "padding", "document", "prefix_lm", "sinks",
    "alibi", "t5", "relative_table", "softcap", "compose_scores", "index_grid", "document_ids",
    "document_positions",
]


# ----------------------------------------------------------------------------------- checks


def _positional_arity(fn) -> Optional[tuple[int, int]]:
    """(required, maximum) positional parameters of ``fn`` (maximum -1: *args), or None if unknown."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    req = mx = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            mx = -1
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            mx = mx if mx < 0 else mx + 1
            req += p.default is p.empty
        elif p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            return (99, 99)  # a required keyword: cannot be called positionally
    return req, mx


def _check_signature(name: str, fn, names: str, n: int) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable {name}({names}), got {type(fn).__name__}")
    arity = _positional_arity(fn)
    if arity is not None:
        req, mx = arity
        if req > n or (0 <= mx < n):
            raise TypeError(
                f"{name} must take {n} positional arguments ({names}) as in FlexAttention; "
                f"{getattr(fn, '__name__', fn)!r} has signature {inspect.signature(fn)}"
            )
    for t in _global_grad_tensors(fn):
        raise ValueError(
            f"{name} reads the global tensor {t!r} that requires grad; its gradient would be lost. "
            "Capture it in a closure (or functools.partial) instead"
        )


def index_grid(B: int, H: int, Tq: int, Tk: int, device, q_start: int = 0, k_start: int = 0):
    """(b, h, q_idx, kv_idx) as broadcastable int64 tensors (B,1,1,1), (1,H,1,1), (1,1,Tq,1), (1,1,1,Tk)."""
    ar = lambda n, s=0: torch.arange(s, s + n, device=device)  # noqa: E731
    return (ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1), ar(Tq, q_start).view(1, 1, Tq, 1),
            ar(Tk, k_start).view(1, 1, 1, Tk))


def check_score_mod(score_mod, *, dtype: torch.dtype, device) -> None:
    """``score_mod`` takes (score, b, h, q_idx, kv_idx) and returns a floating tensor that
    broadcasts to the score's shape: probed on one element before any kernel runs."""
    if score_mod is None:
        return
    _check_signature("score_mod", score_mod, "score, b, h, q_idx, kv_idx", 5)
    b, h, qi, ki = index_grid(1, 1, 1, 1, device)
    out = score_mod(torch.zeros(1, 1, 1, 1, dtype=dtype, device=device), b, h, qi, ki)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"score_mod must return a floating tensor (the new score), got {got}")


def check_mask_mod(mask_mod, *, device) -> None:
    """``mask_mod`` takes (b, h, q_idx, kv_idx) and returns a bool tensor: probed on one element."""
    if mask_mod is None:
        return
    _check_signature("mask_mod", mask_mod, "b, h, q_idx, kv_idx", 4)
    out = mask_mod(*index_grid(1, 1, 1, 1, device))
    if not isinstance(out, Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"mask_mod must return a bool tensor (True: the key may be read), got {got}")


# ------------------------------------------------------------------- captured tensors


def _global_grad_tensors(fn) -> list:
    code, glb = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or glb is None:
        return []
    return [glb[n] for n in code.co_names if isinstance(glb.get(n), Tensor) and glb[n].requires_grad]


_WALK_DEPTH = 100  # nesting the walk follows; deeper, it refuses rather than miss a tensor


def _walk(obj, visit, depth: int = 0, active: frozenset = frozenset()):
    """Rebuild ``obj`` with every tensor replaced by ``visit(tensor)``, looking through functions'
    closures, partials, containers and callable objects' attributes. Returns obj itself when
    nothing inside it changed. An object met again inside itself (a cycle) is left as it is: its
    tensors are visited where the walk first entered it. Nesting deeper than ``_WALK_DEPTH`` is
    refused (ValueError): a tensor below it would lose its gradient without a word."""
    if isinstance(obj, Tensor):
        return visit(obj)
    if id(obj) in active:
        return obj
    if depth > _WALK_DEPTH and isinstance(obj, (tuple, list, dict, functools.partial, types.FunctionType)):
        raise ValueError(
            f"a score_mod/mask_mod captures objects nested more than {_WALK_DEPTH} levels deep (at "
            f"{type(obj).__name__}); tensors it captures (learned tables) are looked for to that depth only, "
            "so it is refused rather than losing their gradients: capture the tensor closer to the mod")
    active = active | {id(obj)}
    if isinstance(obj, (tuple, list)):
        items = [_walk(x, visit, depth + 1, active) for x in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    if isinstance(obj, dict):
        items = {k: _walk(x, visit, depth + 1, active) for k, x in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else items
    if isinstance(obj, functools.partial):
        f = _walk(obj.func, visit, depth + 1, active)
        args = _walk(obj.args, visit, depth + 1, active)
        kw = _walk(obj.keywords, visit, depth + 1, active)
        if f is obj.func and args is obj.args and kw is obj.keywords:
            return obj
        return functools.partial(f, *args, **kw)
    if isinstance(obj, types.FunctionType):
        if not obj.__closure__:
            return obj
        values = []
        for c in obj.__closure__:
            try:
                values.append(c.cell_contents)
            except ValueError:  # an empty cell
                values.append(c)
        new = [_walk(v, visit, depth + 1, active) if not isinstance(v, types.CellType) else v for v in values]
        if all(a is b for a, b in zip(new, values)):
            return obj
        cells = tuple(v if isinstance(v, types.CellType) else types.CellType(v) for v in new)
        g = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, cells)
        g.__kwdefaults__ = obj.__kwdefaults__
        return g
    if callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType, types.MethodType)):
        attrs = vars(obj)
        new = {k: _walk(x, visit, depth + 1, active) for k, x in attrs.items()}
        if all(new[k] is attrs[k] for k in attrs):
            return obj
        clone = object.__new__(type(obj))
        clone.__dict__.update(new)
        return clone
    return obj


def captured_tensors(*mods) -> list[Tensor]:
    """The distinct tensors the mods capture, in a fixed order (the order :func:`rebind` reads)."""
    found: dict[int, Tensor] = {}

    def visit(t):
        found.setdefault(id(t), t)
        return t

    for m in mods:
        if m is not None:
            _walk(m, visit)
    return list(found.values())


def rebind(mod, originals: list[Tensor], replacements: list[Tensor]):
    """``mod`` with each captured tensor ``originals[i]`` replaced by ``replacements[i]``."""
    if mod is None or not originals:
        return mod
    table = {id(o): r for o, r in zip(originals, replacements)}
    return _walk(mod, lambda t: table.get(id(t), t))


# ----------------------------------------------------------------------- combinators


def and_masks(*masks: Callable) -> Callable:
    """A mask_mod that allows what every one of ``masks`` allows."""
    def mask(b, h, q_idx, kv_idx):
        ok = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            ok = ok & m(b, h, q_idx, kv_idx)
        return ok
    return mask


def or_masks(*masks: Callable) -> Callable:
    """A mask_mod that allows what any one of ``masks`` allows."""
    def mask(b, h, q_idx, kv_idx):
        ok = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            ok = ok | m(b, h, q_idx, kv_idx)
        return ok
    return mask


def compose_scores(*mods: Callable) -> Callable:
    """A score_mod applying ``mods`` in order."""
    def score_mod(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score
    return score_mod


# --------------------------------------------------------------------- predefined masks


def causal_mask(b, h, q_idx, kv_idx):
    """Causal for q_len == kv_len: ``kv_idx <= q_idx``."""
    return kv_idx <= q_idx


def sliding_window(w: int, *, causal: bool = True) -> Callable:
    """The menu's ``window=w``: the w most recent keys including itself (causal), else ``|i − j| < w``."""
    def mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return ((d >= 0) & (d < w)) if causal else (d.abs() < w)
    return mask


def strided(stride: int) -> Callable:
    """Child et al. 2019 strided pattern: ``|i − j| < l`` or ``(i − j) mod l = 0`` (the menu's
    ``Sparsity("strided")``, which also admits the diagonal; so does this)."""
    def mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d.abs() < stride) | (torch.remainder(d, stride) == 0)
    return mask


def fixed(stride: int, summary: int = 1) -> Callable:
    """Child et al. 2019 fixed pattern: same block of ``stride``, or one of a block's last ``summary``."""
    def mask(b, h, q_idx, kv_idx):
        same = torch.div(q_idx, stride, rounding_mode="floor") == torch.div(kv_idx, stride, rounding_mode="floor")
        return same | (torch.remainder(kv_idx, stride) >= stride - summary) | (q_idx == kv_idx)
    return mask


def padding(key_padding_mask: Tensor) -> Callable:
    """The menu's ``key_padding_mask`` (B, kv_len), True for real keys: a real key, or the query's own position."""
    def mask(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx] | (q_idx == kv_idx)
    return mask


def document(document_ids: Tensor) -> Callable:
    """Document masking for packed sequences: ``document_ids`` (B, T) int; a query reads keys of
    its own document only (combine with :func:`causal_mask` for a decoder)."""
    def mask(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]
    return mask


def document_ids(ids: Tensor, eos_id: int) -> Tensor:
    """Document ids (…, T) int64 of a packed token stream whose documents each end with
    ``eos_id``: 0 for the first document of the block, +1 after each eos (the eos belongs to the
    document it ends). A block that starts mid-document counts that document as its first."""
    is_eos = (ids == eos_id).to(torch.int64)
    return torch.cumsum(is_eos, dim=-1) - is_eos


def document_positions(doc: Tensor) -> Tensor:
    """Positions (…, T) that restart at 0 where the document id changes: ``t − start(doc(t))``."""
    T = doc.shape[-1]
    t = torch.arange(T, device=doc.device).expand(doc.shape)
    start = torch.zeros_like(doc[..., :1]).expand(doc.shape[:-1] + (1,)).to(torch.int64)
    starts = torch.cat([start, torch.where(doc[..., 1:] != doc[..., :-1], t[..., 1:], 0)], dim=-1)
    return t - torch.cummax(starts, dim=-1).values


def prefix_lm(prefix_len) -> Callable:
    """Prefix-LM: keys before ``prefix_len`` (an int, or a (B,) tensor) are read by every query;
    the rest causally."""
    def mask(b, h, q_idx, kv_idx):
        n = prefix_len[b] if isinstance(prefix_len, Tensor) else prefix_len
        return (kv_idx <= q_idx) | (kv_idx < n)
    return mask


def sinks(n_sinks: int, w: int) -> Callable:
    """Sliding window ``w`` (causal) plus the first ``n_sinks`` keys ("attention sinks")."""
    win = sliding_window(w)
    def mask(b, h, q_idx, kv_idx):
        return win(b, h, q_idx, kv_idx) | ((kv_idx < n_sinks) & (kv_idx <= q_idx))
    return mask


# --------------------------------------------------------------------- predefined scores


def alibi(slopes: Tensor) -> Callable:
    """Press et al. 2022: ``score − slopes[h] · |i − j|`` (the menu's ``RelativeBias("alibi")`` when
    q_len == kv_len)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - table_lookup(slopes, h).to(score.dtype) * (kv_idx - q_idx).abs().to(score.dtype)
    return score_mod


def t5(table: Tensor, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> Callable:
    """Raffel et al. 2020: ``score + table[h, bucket(j − i)]`` (the menu's ``RelativeBias("t5")``
    when q_len == kv_len)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        bucket = t5_bucket(kv_idx - q_idx, bidirectional=bidirectional, num_buckets=num_buckets,
                           max_distance=max_distance)
        return score + table_lookup(table, h, bucket).to(score.dtype)
    return score_mod


def relative_table(table: Tensor, max_distance: int) -> Callable:
    """A learned per-head bias by clipped offset: ``score + table[h, clip(j − i, −K, K) + K]``,
    table (heads, 2K + 1)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        idx = (kv_idx - q_idx).clamp(-max_distance, max_distance) + max_distance
        return score + table_lookup(table, h, idx).to(score.dtype)
    return score_mod


def softcap(cap: float) -> Callable:
    """Logit soft-capping (Gemma 2): ``cap · tanh(score / cap)``."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod
