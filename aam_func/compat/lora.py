"""The guide's LoRA modules over :mod:`aam_func.peft.lora` (one formula: ``lora.linear``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import Bound
from ..peft import lora as _lora
from .base import LinearView, draw_seed

__all__ = ["LoRALayer", "LoRALinear", "apply_lora"]


# ----------------------------------------------------------------------------- LoRA


class LoRALayer(nn.Module):
    """The low-rank branch alone: ``s · B · A · drop(x)``, s = alpha / rank, (..., in) -> (..., out).

    ``lora_A`` (rank, in) starts kaiming-uniform and ``lora_B`` (out, rank) at zero (PEFT's
    names and init, from :class:`aam_func.peft.LoRA`), so the branch is 0 until trained."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, *, seed: Optional[int] = None):
        super().__init__()
        self.lora = _lora.LoRA((_lora.Target("lora", in_features, out_features),), rank, float(alpha), float(dropout))
        ab = self.lora.init(draw_seed(seed))["lora"]
        self.lora_A = nn.Parameter(ab["lora_A"])
        self.lora_B = nn.Parameter(ab["lora_B"])
        # the branch is lora.linear over a zero base weight of one output column (broadcast):
        # the formula stays in aam_func.peft.lora, and the base costs one (..., in) x (in, 1) product.
        self.register_buffer("_zero_base", torch.zeros(in_features, 1), persistent=False)

    @property
    def scaling(self) -> float:
        return self.lora.scale

    def forward(self, x: Tensor) -> Tensor:
        p = self.lora.dropout if self.training else 0.0
        zero = self._zero_base.to(x.dtype)
        return _lora.linear(x, zero, None, self.lora_A, self.lora_B, self.lora.scale, dropout=p, fan_in_fan_out=True)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) plus a LoRA branch:
    ``base(x) + s · B · A · drop(x)`` through :func:`aam_func.peft.lora.linear`. The base layer is
    kept as ``base_layer`` (PEFT's name); ``lora_A``/``lora_B`` are the trainable adapters."""

    def __init__(self, linear: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 *, seed: Optional[int] = None):
        super().__init__()
        conv1d = _lora.conv1d_type()
        if isinstance(linear, (LinearView,)):
            raise TypeError(
                "this nn.Linear is a view of an aam_func model's functional params: replacing it does not change "
                "the model's forward. Use aam_func.peft.lora: spec, adapters = lora.init(model, targets=[...], "
                "rank=..., alpha=...); out = spec.call(model, adapters, input_ids)"
            )
        if isinstance(linear, nn.Linear):
            fan_in_fan_out, (out_f, in_f) = False, linear.weight.shape
        elif conv1d is not None and isinstance(linear, conv1d):
            fan_in_fan_out, (in_f, out_f) = True, linear.weight.shape
        else:
            raise TypeError(f"LoRALinear wraps an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        self.base_layer = linear
        self.lora = _lora.LoRA((_lora.Target("base_layer", int(in_f), int(out_f), fan_in_fan_out),),
                               rank, float(alpha), float(dropout))
        ab = self.lora.init(draw_seed(seed), dtype=linear.weight.dtype)["base_layer"]
        self.lora_A = nn.Parameter(ab["lora_A"].to(linear.weight.device))
        self.lora_B = nn.Parameter(ab["lora_B"].to(linear.weight.device))

    @property
    def in_features(self) -> int:
        return self.lora.targets[0].in_features

    @property
    def out_features(self) -> int:
        return self.lora.targets[0].out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def scaling(self) -> float:
        return self.lora.scale

    def forward(self, x: Tensor) -> Tensor:
        t = self.lora.targets[0]
        p = self.lora.dropout if self.training else 0.0
        return _lora.linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                            self.lora.scale, dropout=p, fan_in_fan_out=t.fan_in_fan_out)


def apply_lora(model: nn.Module, targets, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               *, seed: Optional[int] = None) -> list[str]:
    """Replace the ``nn.Linear`` / GPT-2 ``Conv1D`` submodules that ``targets`` selects by
    :class:`LoRALinear` in place, at their dotted place (``model.get_submodule(parent)``, then
    ``setattr(parent, child, ...)``): what the guide's ``setattr(model, name, LoRALinear(module))``
    loop meant. ``targets``: globs, plain names (``"c_fc"`` matches every ``*.c_fc``) or a
    predicate over weight names, resolved by :func:`aam_func.peft.lora.targets_of`. Returns the
    replaced module names. Base weights stay trainable; freeze them as the guide does.
    """
    if isinstance(model, Bound):
        raise TypeError(
            f"apply_lora replaces torch submodules, but {type(model).__name__}'s forward is functional. "
            "Use aam_func.peft.lora: spec, adapters = lora.init(model, targets=[...], rank=..., alpha=...); "
            "out = spec.call(model, adapters, input_ids)"
        )
    found = _lora.targets_of(model, targets)
    base = draw_seed(seed)
    for i, t in enumerate(found):
        parent_name, _, child = t.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank=rank, alpha=alpha, dropout=dropout, seed=base + i))
    return [t.name for t in found]
