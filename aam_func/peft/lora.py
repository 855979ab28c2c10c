"""LoRA (Hu et al. 2021) as a pure parameter transform, on aam_func Params and any ``nn.Module``.

    spec, adapters = lora.init(params_or_module, targets=["*.attn.qkv"], rank=8, alpha=16)
    eff = spec.merged(params, adapters)                 # W + s·B·A, same form as params
    out = spec.apply(model.apply, params, adapters, ids) # x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ, W never formed
    out = spec.call(hf_model, adapters, input_ids)       # any nn.Module, without touching it
    g = torch.func.grad(lambda a: spec.apply(model.apply, params, a, ids, labels=ids)["loss"])(adapters)

Adapters are Params: ``{"blocks": {"0": {"attn": {"qkv": {"lora_A": (r, in), "lora_B": (out, r)}}}}}``,
keyed by the target weight's dotted name minus ``.weight``. The scale ``s = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023), the dropout and each target's orientation
are static facts, so they live in the frozen :class:`LoRA` spec, not in the tensor tree: a
Params tree goes through ``grad`` and optimizer updates and could not carry them.

GPT-2's ``Conv1D`` stores its weight as (in, out); A and B keep PEFT's (r, in), (out, r), and the
merged delta is transposed, ``(s·B·A)ᵀ`` (``fan_in_fan_out``). The factored form needs no
transpose: ``x·(B·A)ᵀ = (x·Aᵀ)·Bᵀ`` for both layouts.

How the factored form reaches layers it does not own: inside :meth:`LoRA.active`,
:class:`aam_func.intercept.Intercept` recognises the target weights *by identity* as they reach
``F.linear(x, W, b)`` (nn.Linear, aam_func's Linear) or ``torch.addmm(b, x, W)`` (Conv1D), and
this module's client adds the low-rank branch there; any other use of a target weight (an
embedding lookup, a tied head, ``W.t()``) receives the merged weight ``W + s·B·A``; shape/dtype
reads pass through. Nothing is written into modules or params. Proofs: ``proofs/lora.md``.

PEFT's adapter files (``save_pretrained`` / ``load_pretrained``) live in
:mod:`aam_func.interop.peft`, which builds on this module (``aam_func.peft`` re-exports them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import init as initializers
from ..checks import check_choice, check_int, check_number
from ..intercept import Client, Intercept, Use
from ..layers.basic import dropout as _dropout
from ..tree import Params, check_structure, flatten, unflatten
from .targets import Target, TargetSpec, conv1d_type, module_candidates, targets_of

__all__ = [
    "LoRA",
    "Target",
    "init",
    "targets_of",
    "merged",
    "unmerge",
    "call",
    "linear",
    "from_cli_args",
    "module_candidates",
    "conv1d_type",
    "INITS",
    "DEFAULT_CLI_TARGETS",
]

INITS = ("kaiming", "gaussian")


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class LoRA:
    """Static LoRA facts: which weights, rank r, alpha, dropout on the low-rank input, rsLoRA.

    ``scale`` = alpha / r (Hu et al. 2021) or alpha / sqrt(r) (rsLoRA). ``init_kind``:
    ``"kaiming"`` draws A like PEFT (kaiming-uniform, a=√5, i.e. U(±1/√in)), ``"gaussian"`` draws
    A ~ N(0, 1/r²) as PEFT's ``init_lora_weights="gaussian"``; B is zero unless ``b_std`` > 0.
    """

    targets: tuple[Target, ...]
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init_kind: str = field(default="kaiming", compare=False)  # init-only facts: specs that compute
    b_std: float = field(default=0.0, compare=False)           # the same function compare equal

    def __post_init__(self):
        check_int("LoRA rank", self.rank, min=1)
        if not self.targets:
            raise ValueError("LoRA needs at least one target")
        for t in self.targets:
            if self.rank > min(t.in_features, t.out_features):
                raise ValueError(
                    f"LoRA rank {self.rank} exceeds min(in, out) = {min(t.in_features, t.out_features)} "
                    f"of {t.name!r} ({t.in_features} -> {t.out_features})"
                )
        check_number("LoRA alpha", self.alpha)
        check_number("LoRA dropout", self.dropout, min=0, max=1, max_open=True)
        if self.init_kind not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init_kind!r}")
        check_number("b_std", self.b_std, min=0)
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA targets repeat a name: {names}")

    @classmethod
    def build(
        cls,
        target: Any,
        *,
        targets: TargetSpec,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        b_std: float = 0.0,
        fan_in_fan_out=False,
    ) -> "LoRA":
        """Resolve ``targets`` against ``target`` (Params or nn.Module) and validate."""
        if init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {init!r}")
        return cls(targets_of(target, targets, fan_in_fan_out=fan_in_fan_out), rank, float(alpha), float(dropout),
                   bool(use_rslora), init, float(b_std))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    # ------------------------------------------------------------------ init
    def init(self, seed: Optional[int] = 0, *, generator: Optional[torch.Generator] = None,
             dtype: torch.dtype = torch.float32) -> Params:
        """Fresh adapters; the same seed gives the same tensors."""
        g = initializers.generator(seed if generator is None else generator)
        flat = {}
        for t in self.targets:
            if self.init_kind == "kaiming":
                a = initializers.kaiming_uniform((self.rank, t.in_features), g, dtype, a=math.sqrt(5))
            else:
                a = initializers.normal((self.rank, t.in_features), g, dtype, std=1.0 / self.rank)
            if self.b_std > 0:
                b = initializers.normal((t.out_features, self.rank), g, dtype, std=self.b_std)
            else:
                b = torch.zeros(t.out_features, self.rank, dtype=dtype)
            flat[t.name + ".lora_A"], flat[t.name + ".lora_B"] = a, b
        return unflatten(flat)

    def shapes(self) -> Params:
        """The expected adapter structure (a tree of shapes)."""
        flat = {}
        for t in self.targets:
            flat[t.name + ".lora_A"] = torch.Size((self.rank, t.in_features))
            flat[t.name + ".lora_B"] = torch.Size((t.out_features, self.rank))
        return unflatten(flat)

    def check(self, adapters: Mapping) -> dict[str, tuple[Tensor, Tensor]]:
        """Validate ``adapters`` against the spec; ``{name: (A, B)}``."""
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be a Params tree, got {type(adapters).__name__}")
        flat = flatten(adapters)
        expected = flatten(self.shapes())
        if len(flat) != len(expected) or any(
            k not in flat or not isinstance(flat[k], Tensor) or tuple(flat[k].shape) != s for k, s in expected.items()
        ):
            check_structure(self.shapes(), adapters, what="LoRA adapters")
            raise TypeError("LoRA adapter leaves must be tensors")
        return {t.name: (flat[t.name + ".lora_A"], flat[t.name + ".lora_B"]) for t in self.targets}

    # ------------------------------------------------------------------ merge
    def delta(self, target: Target, a: Tensor, b: Tensor) -> Tensor:
        """s·B·A in the weight's own layout ((in, out) for Conv1D)."""
        d = (b @ a) * self.scale
        return d.t() if target.fan_in_fan_out else d

    def _apply_delta(self, params: Mapping, adapters: Mapping, sign: float) -> Mapping:
        ab = self.check(adapters)
        flat = flatten(params)  # any form; unflatten gives that form back (same keys)
        problems = []
        for t in self.targets:
            key = t.name + ".weight"
            w = flat.get(key)
            if not isinstance(w, Tensor):
                problems.append(f"{key} missing")
            elif tuple(w.shape) != t.weight_shape:
                problems.append(f"{key} has shape {tuple(w.shape)}, expected {t.weight_shape}")
        if problems:
            raise ValueError("params do not fit the LoRA targets: " + "; ".join(problems))
        for t in self.targets:
            key = t.name + ".weight"
            w = flat[key]
            d = self.delta(t, *ab[t.name])
            flat[key] = w + sign * d.to(w.dtype)
        return unflatten(flat)

    def merged(self, params: Mapping, adapters: Mapping) -> Mapping:
        """Effective params: every target weight W becomes W + s·B·A (Conv1D: + (s·B·A)ᵀ).
        Params come back in their own form (nested, a flat ``named_parameters()`` dict, ...).
        Pure and differentiable wrt both arguments. LoRA dropout does not apply here (a merged
        weight cannot drop the low-rank branch's input); use :meth:`apply`/:meth:`call`."""
        return self._apply_delta(params, adapters, 1.0)

    def unmerge(self, params: Mapping, adapters: Mapping) -> Mapping:
        """Inverse of :meth:`merge`: W' − s·B·A restores W up to float rounding."""
        return self._apply_delta(params, adapters, -1.0)

    # ------------------------------------------------------------------ factored form
    @contextlib.contextmanager
    def active(self, base: Any, adapters: Mapping, *, train: bool = False,
               generator: Optional[torch.Generator] = None):
        """Within this context, the target weights of ``base`` (Params or an nn.Module) act as
        W + s·B·A: ``F.linear(x, W, b)`` and Conv1D's ``torch.addmm(b, x, W)`` become the factored
        ``x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``; other uses of W see the merged weight. Dropout on the
        branch input when ``train`` (``generator``, else the global RNG that ``vmap`` controls)."""
        ab = self.check(adapters)
        weights = _weights_of(base, self.targets)  # two targets sharing one tensor: Intercept refuses
        client = _LoraClient(self, {t.name: (t, *ab[t.name]) for t in self.targets}, self.dropout if train else 0.0,
                             generator)
        with Intercept(weights, client):
            yield

    def apply(self, fn: Callable, params: Mapping, adapters: Mapping, *args, **kwargs):
        """``fn(params, *args, **kwargs)`` with the adapters active (no dropout), e.g.
        ``spec.apply(model.apply, params, adapters, ids, labels=ids)``. For dropout use
        :meth:`wrap` with ``train=True``."""
        with self.active(params, adapters):
            return fn(params, *args, **kwargs)

    def wrap(self, fn: Callable, *, train: bool = False, generator: Optional[torch.Generator] = None) -> Callable:
        """``g(params, adapters, *args, **kwargs) = fn(params, *args, **kwargs)`` with the adapters
        active; dropout on the low-rank input when ``train``."""

        def wrapped(params, adapters, *args, **kwargs):
            with self.active(params, adapters, train=train, generator=generator):
                return fn(params, *args, **kwargs)

        return wrapped

    def call(self, module: nn.Module, adapters: Mapping, *args, **kwargs):
        """Run any ``nn.Module`` with the adapters, factored form (dropout when
        ``module.training``), without changing the module."""
        with self.active(module, adapters, train=module.training):
            return module(*args, **kwargs)

    def call_merged(self, module: nn.Module, adapters: Mapping, *args, **kwargs):
        """Run ``module`` through ``torch.func.functional_call`` with merged target weights."""
        ab = self.check(adapters)
        weights = _weights_of(module, self.targets)
        eff = {t.name + ".weight": weights[t.name] + self.delta(t, *ab[t.name]).to(weights[t.name].dtype)
               for t in self.targets}
        return torch.func.functional_call(module, eff, args, kwargs)

    def loss(self, loss_fn: Callable, params: Mapping, *, mode: str = "factored", train: bool = True) -> Callable:
        """``loss(adapters, batch, generator=None) = loss_fn(params ⊕ adapters, batch[, generator])``
        over frozen ``params``: differentiate it (or hand it to ``train.make_train_step``) wrt
        the adapters only. ``mode``: ``"factored"`` (dropout when ``train``) or ``"merged"``."""
        check_choice("mode", mode, ("factored", "merged"))
        if mode == "merged" and self.dropout > 0 and train:
            raise ValueError("LoRA dropout needs the factored form; use mode='factored' or dropout=0")

        def lora_loss(adapters, batch, generator: Optional[torch.Generator] = None):
            extra = (generator,) if generator is not None else ()
            if mode == "merged":
                return loss_fn(self.merged(params, adapters), batch, *extra)
            with self.active(params, adapters, train=train, generator=generator):
                return loss_fn(params, batch, *extra)

        return lora_loss


def _weights_of(base: Any, targets: Iterable[Target]) -> dict[str, Tensor]:
    """The target weight tensors of Params or an nn.Module (the very objects its forward uses)."""
    from ..nn import Bound, Functional

    out, missing = {}, []
    if isinstance(base, Bound):
        base = base.params()
    if isinstance(base, Functional):
        base = base.params
    if isinstance(base, nn.Module):
        for t in targets:
            try:
                w = base.get_parameter(t.name + ".weight")
            except AttributeError:
                missing.append(t.name + ".weight")
                continue
            out[t.name] = w
    elif base is not None and not isinstance(base, Tensor):
        flat = flatten(base)
        for t in targets:
            w = flat.get(t.name + ".weight")
            if w is None:
                missing.append(t.name + ".weight")
            else:
                out[t.name] = w
    else:
        raise TypeError(f"LoRA base must be Params or an nn.Module, got {type(base).__name__}")
    if missing:
        raise ValueError("the base lacks LoRA target weights: " + ", ".join(missing))
    bad = [f"{t.name}.weight has shape {tuple(out[t.name].shape)}, expected {t.weight_shape}"
           for t in targets if tuple(out[t.name].shape) != t.weight_shape]
    if bad:
        raise ValueError("the base does not fit the LoRA targets: " + "; ".join(bad))
    return out


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float, *,
           dropout: float = 0.0, generator: Optional[torch.Generator] = None, fan_in_fan_out: bool = False) -> Tensor:
    """The factored LoRA linear: ``x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` (Conv1D: ``x·W + b + …``).
    (..., in) -> (..., out). Costs O(N·r·(in+out)) beyond the base matmul and never forms B·A."""
    base = (x @ weight + bias if bias is not None else x @ weight) if fan_in_fan_out else F.linear(x, weight, bias)
    h = _dropout(x, dropout, train=dropout > 0, generator=generator) if dropout > 0 else x
    return base + F.linear(F.linear(h, a), b) * scale


class _LoraClient(Client):
    """See :meth:`LoRA.active`: what LoRA does at the uses of its target weights
    (:mod:`aam_func.intercept` finds them). ``entries``: {target name: (Target, A, B)}."""

    def __init__(self, spec: LoRA, entries: dict, p: float, generator):
        self.spec, self.entries, self.p, self.generator = spec, entries, p, generator

    def _merged_weight(self, name: str, w: Tensor) -> Tensor:
        target, a, b = self.entries[name]
        return w + self.spec.delta(target, a, b).to(w.dtype)

    def linear(self, use: Use) -> Tensor:
        target, a, b = self.entries[use.key]
        if (use.kind == "addmm") != target.fan_in_fan_out:  # a layout the target does not have
            return use.run(self._merged_weight(use.key, use.weight))
        x = use.input
        h = _dropout(x, self.p, train=True, generator=self.generator) if self.p > 0 else x
        a = a if a.dtype == x.dtype else a.to(x.dtype)
        b = b if b.dtype == x.dtype else b.to(x.dtype)
        return use.run() + F.linear(F.linear(h, a), b) * self.spec.scale

    def embedding(self, use: Use) -> Tensor:
        return use.run(self._merged_weight(use.key, use.weight))

    def other(self, key, tensor: Tensor) -> Tensor:
        return self._merged_weight(key, tensor)


# --------------------------------------------------------------------------- functional front


def init(target: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> tuple[LoRA, Params]:
    """``(spec, adapters)`` for ``target`` (Params, a flat state_dict or an nn.Module).

    ``options`` are :meth:`LoRA.build`'s (``targets``, ``rank``, ``alpha`` required; ``dropout``,
    ``init``, ``use_rslora``, ``b_std``, ``fan_in_fan_out``). ``adapters`` is a Params tree of
    ``lora_A`` (r, in) and ``lora_B`` (out, r) per target (B zero unless ``b_std`` > 0), drawn
    from ``seed``; ``spec`` holds the static facts (see :class:`LoRA`)."""
    spec = LoRA.build(target, **options)
    return spec, spec.init(seed, dtype=dtype)


def merged(spec: LoRA, params: Mapping, adapters: Mapping) -> Mapping:
    return spec.merged(params, adapters)


def unmerge(spec: LoRA, params: Mapping, adapters: Mapping) -> Mapping:
    return spec.unmerge(params, adapters)


def call(spec: LoRA, module: nn.Module, adapters: Mapping, *args, **kwargs):
    return spec.call(module, adapters, *args, **kwargs)


DEFAULT_CLI_TARGETS = ("*.attn.qkv", "*.attn.out")


def from_cli_args(
    params: Params,
    rank: int,
    alpha: Optional[float] = None,
    targets: Optional[TargetSpec] = None,
    seed: int = 0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> tuple[LoRA, Params, Callable[[Callable], Callable]]:
    """For ``aam-func train --init-from DIR --lora-rank R [--lora-alpha A --lora-targets ...]``.

    Returns ``(spec, adapters, wrap_loss)``: ``wrap_loss(loss_fn)`` turns
    ``loss_fn(params, batch[, generator])`` into ``loss(adapters, batch[, generator])`` over the
    frozen ``params``; give that and ``adapters`` to ``train.make_train_step`` in place of the
    params, so gradients and the optimizer state cover the adapters only. ``alpha`` defaults to
    ``2·rank``; ``targets`` to the attention projections (``*.attn.qkv``, ``*.attn.out``); a
    comma-separated string is split."""
    if isinstance(targets, str):
        given = targets
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:  # "," or " " would otherwise fall back to the default targets silently
            raise ValueError(f"LoRA targets {given!r} name no target; give comma-separated globs or names "
                             f"such as {','.join(DEFAULT_CLI_TARGETS)!r}, or leave them out for that default")
    rank = check_int("rank", rank, min=1)  # 2.7 or True is a mistake, not 2 or 1
    alpha = check_number("alpha", 2 * rank if alpha is None else alpha)
    spec, adapters = init(
        params, targets=list(DEFAULT_CLI_TARGETS if targets is None else targets), rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, seed=seed,
    )

    def wrap_loss(loss_fn: Callable, *, train: bool = True) -> Callable:
        return spec.loss(loss_fn, params, mode="factored", train=train)

    return spec, adapters, wrap_loss
