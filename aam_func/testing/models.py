"""Model properties as functions, for any functional model (and an ``nn.Module`` through
:func:`from_module`).

``apply(params, input_ids, **kwargs)`` returns the per-position output: a tensor
``(batch, seq, ...)`` or a dict holding it under ``output`` (``"logits"`` by default), as
``Transformer.apply`` does. Each check returns the worst difference it saw and raises
:class:`PropertyError` (an ``AssertionError``) naming the property, where it broke and by how
much.

    from aam_func.testing import models as props
    props.check_causal(model.apply, params, ids)
    props.check_padding_invariance(model.apply, params, ids, side="left")
    props.check_batch_invariance(model.apply, params, ids)
    props.check_vmap_equals_loop(lambda p, x: model.apply(p, x[None], labels=x[None])["loss"], params, ids)
    props.check_init_determinism(lambda seed: model.init(seed=seed))
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils import _pytree as pytree

__all__ = ["PropertyError", "check_causal", "check_padding_invariance", "check_batch_invariance",
           "check_vmap_equals_loop", "check_init_determinism", "from_module"]


class PropertyError(AssertionError):
    """A model property does not hold; the message names it, where, and the worst difference."""


def _out(apply: Callable, params: Any, ids: Tensor, output: Optional[str], **kw) -> Tensor:
    out = apply(params, ids, **kw)
    if isinstance(out, dict):
        key = output or "logits"
        if key not in out:
            raise KeyError(f"apply returned a dict without {key!r} (keys: {sorted(out)}); pass output=...")
        out = out[key]
    if not isinstance(out, Tensor) or out.dim() < 2 or tuple(out.shape[:2]) != tuple(ids.shape[:2]):
        raise TypeError(f"apply must return a (batch, seq, ...) tensor for input_ids {tuple(ids.shape)}, got "
                        f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
    return out


def _worst(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _ids(input_ids: Any) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer (batch, seq) tensor, got {input_ids!r:.80}")
    return input_ids


def check_causal(apply: Callable, params: Any, input_ids: Tensor, *, vocab_size: Optional[int] = None,
                 atol: float = 1e-5, output: Optional[str] = None, **kwargs) -> float:
    """Position t's output depends on tokens 0..t only: for each t, changing every token after t
    leaves outputs 0..t unchanged. ``vocab_size`` (default: the output's last dimension) bounds
    the replacement tokens."""
    ids = _ids(input_ids)
    base = _out(apply, params, ids, output, **kwargs)
    V = vocab_size or base.shape[-1]
    worst = 0.0
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(ids.shape[1] - t - 1, device=ids.device)) % V
        got = _out(apply, params, changed, output, **kwargs)
        w = _worst(got[:, : t + 1], base[:, : t + 1])
        worst = max(worst, w)
        if not w <= atol:
            raise PropertyError(f"check_causal: changing the tokens after position {t} changed the output at "
                                f"positions <= {t} by up to {w:.3g} (atol={atol:g}): the model sees the future")
    return worst


def check_padding_invariance(apply: Callable, params: Any, input_ids: Tensor, *, n_pad: int = 2, side: str = "right",
                             pad_ids: tuple = (0, 1), mask_arg: str = "attention_mask",
                             position_arg: Optional[str] = "position_ids", atol: float = 1e-5,
                             output: Optional[str] = None, **kwargs) -> float:
    """Padding changes nothing at real positions: ``input_ids`` padded with ``n_pad`` tokens on
    ``side`` ("left", "right" or "both"), with a 0/1 mask under ``mask_arg``, gives the unpadded
    outputs at the real positions, whatever the pad tokens are (each of ``pad_ids`` is tried).
    On the left, real tokens keep positions 0, 1, ... (passed as ``position_arg``; None: none
    passed, for models that take no positions)."""
    if side not in ("left", "right", "both"):
        raise ValueError(f"side={side!r}: expected 'left', 'right' or 'both'")
    if n_pad < 1:
        raise ValueError(f"n_pad={n_pad}: expected at least 1")
    ids = _ids(input_ids)
    ref = _out(apply, params, ids, output, **kwargs)
    B, T = ids.shape
    worst = 0.0
    for s in (["left", "right"] if side == "both" else [side]):
        for pad in pad_ids:
            pads = torch.full((B, n_pad), pad, dtype=ids.dtype, device=ids.device)
            padded = torch.cat([pads, ids], 1) if s == "left" else torch.cat([ids, pads], 1)
            mask = torch.ones_like(padded)
            real = slice(n_pad, None) if s == "left" else slice(0, T)
            if s == "left":
                mask[:, :n_pad] = 0
            else:
                mask[:, T:] = 0
            kw = dict(kwargs, **{mask_arg: mask})
            if position_arg is not None:
                kw[position_arg] = (mask.cumsum(-1) - 1).clamp(min=0)
            got = _out(apply, params, padded, output, **kw)[:, real]
            w = _worst(got, ref)
            worst = max(worst, w)
            if not w <= atol:
                raise PropertyError(f"check_padding_invariance: {n_pad} pad token(s) (id {pad}) on the {s} changed the "
                                    f"outputs at real positions by up to {w:.3g} (atol={atol:g}): padding leaks")
    return worst


def check_batch_invariance(apply: Callable, params: Any, input_ids: Tensor, *, atol: float = 1e-5,
                           output: Optional[str] = None, **kwargs) -> float:
    """Each example alone gives what it gives inside the batch: batch elements do not interact.
    Tensor keyword arguments with the batch's leading size (masks, positions) are sliced too."""
    ids = _ids(input_ids)
    if ids.shape[0] < 2:
        raise ValueError(f"check_batch_invariance needs a batch of at least 2, got input_ids {tuple(ids.shape)}")
    full = _out(apply, params, ids, output, **kwargs)
    worst = 0.0
    for b in range(ids.shape[0]):
        kw = {k: v[b:b + 1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == ids.shape[0] else v for k, v in kwargs.items()}
        alone = _out(apply, params, ids[b:b + 1], output, **kw)
        w = _worst(alone, full[b:b + 1])
        worst = max(worst, w)
        if not w <= atol:
            raise PropertyError(f"check_batch_invariance: example {b} alone differs from example {b} in the batch by "
                                f"up to {w:.3g} (atol={atol:g}): batch elements interact")
    return worst


def check_vmap_equals_loop(loss: Callable, params: Any, batch: Any, *, atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """Per-sample gradients: ``vmap(grad(loss), in_dims=(None, 0))(params, batch)`` equals
    ``grad(loss)(params, example_i)`` for each ``i``. ``loss(params, example)`` takes one
    example (the batch's leading dim removed); ``batch`` is a tensor or a pytree of them."""
    leaves = pytree.tree_leaves(batch)
    if not leaves or any(not isinstance(x, Tensor) or x.dim() == 0 for x in leaves):
        raise TypeError("batch must be a tensor or a pytree of tensors with a leading batch dimension")
    n = leaves[0].shape[0]
    batched = vmap(grad(loss), in_dims=(None, 0))(params, batch)
    flat_b, _ = pytree.tree_flatten(batched)
    worst = 0.0
    for i in range(n):
        example = pytree.tree_map(lambda x: x[i], batch)
        flat_i, _ = pytree.tree_flatten(grad(loss)(params, example))
        for k, (a, b) in enumerate(zip(flat_b, flat_i)):
            w = _worst(a[i], b)
            worst = max(worst, w)
            if not torch.allclose(a[i].detach(), b.detach(), atol=atol, rtol=rtol):
                raise PropertyError(f"check_vmap_equals_loop: example {i}, gradient leaf {k}: vmap(grad) differs from "
                                    f"grad of the example alone by up to {w:.3g} (atol={atol:g}, rtol={rtol:g})")
    return worst


def check_init_determinism(init: Callable[[int], Any], *, seeds: tuple = (0, 1)) -> float:
    """``init(seed)`` is a pure function of the seed: the same seed twice gives equal leaves
    (also after drawing from the global RNG in between), two seeds give different ones."""
    a = pytree.tree_leaves(init(seeds[0]))
    torch.rand(7)  # global RNG moved: a seeded init must not read it
    b = pytree.tree_leaves(init(seeds[0]))
    if len(a) != len(b):
        raise PropertyError(f"check_init_determinism: seed {seeds[0]} gave {len(a)} then {len(b)} leaves")
    for k, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, Tensor) and not torch.equal(x, y):
            raise PropertyError(f"check_init_determinism: seed {seeds[0]} twice gave different leaf {k} "
                                f"(worst {_worst(x, y):.3g}): init reads state other than its seed")
    c = pytree.tree_leaves(init(seeds[1]))
    if all(not isinstance(x, Tensor) or torch.equal(x, y) for x, y in zip(a, c)):
        raise PropertyError(f"check_init_determinism: seeds {seeds[0]} and {seeds[1]} gave identical params: init ignores its seed")
    return 0.0


def from_module(module: torch.nn.Module) -> tuple:
    """``(apply, params)`` for an ``nn.Module``: ``apply(params, *args, **kwargs)`` is
    ``torch.func.functional_call(module, params, args, kwargs)``; ``params`` holds detached
    copies of its parameters and buffers, under their ``state_dict`` names."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_module expects a torch.nn.Module, got {type(module).__name__}")
    params = {k: v.detach().clone() for k, v in list(module.named_parameters()) + list(module.named_buffers())}

    def apply(p, *args, **kwargs):
        return torch.func.functional_call(module, p, args, kwargs)

    return apply, params
