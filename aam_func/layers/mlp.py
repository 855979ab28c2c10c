"""Position-wise feed-forward networks: gelu / gelu_tanh / relu / silu, and SwiGLU (Shazeer 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_choice
from ..tree import Params
from .basic import Linear

__all__ = ["MLP", "activation", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")  # MLP kinds; all but swiglu are activation()'s


def activation(kind: str, x: Tensor) -> Tensor:
    check_choice("activation", kind, ACTIVATIONS[:-1])  # swiglu is a gated MLP, not an activation
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":  # GPT-2's "gelu_new"
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    return F.silu(x)


@dataclass(frozen=True)
class MLP:
    """kind != swiglu: proj(act(fc(x))). swiglu: down(silu(gate(x)) * up(x)) as in LLaMA.

    (..., d_model) -> (..., d_model). ``out_std`` initialises the output projection (GPT-2 scales
    it by 1/sqrt(2 n_layers)).
    """

    d_model: int
    d_ff: int
    kind: str = "gelu"
    bias: bool = True
    weight_init: str = "normal"
    std: float = 0.02
    out_std: float = 0.02

    def __post_init__(self):
        check_choice("mlp kind", self.kind, ACTIVATIONS)

    def _layers(self):
        inner = dict(bias=self.bias, weight_init=self.weight_init, std=self.std)
        out = Linear(self.d_ff, self.d_model, bias=self.bias, weight_init=self.weight_init, std=self.out_std)
        if self.kind == "swiglu":
            return {"gate": Linear(self.d_model, self.d_ff, **inner), "up": Linear(self.d_model, self.d_ff, **inner), "down": out}
        return {"fc": Linear(self.d_model, self.d_ff, **inner), "proj": out}

    def init(self, generator: torch.Generator) -> Params:
        return {name: layer.init(generator) for name, layer in self._layers().items()}

    def apply(self, params: Params, x: Tensor) -> Tensor:
        L = self._layers()
        if self.kind == "swiglu":
            h = F.silu(L["gate"].apply(params["gate"], x)) * L["up"].apply(params["up"], x)
            return L["down"].apply(params["down"], h)
        return L["proj"].apply(params["proj"], activation(self.kind, L["fc"].apply(params["fc"], x)))
