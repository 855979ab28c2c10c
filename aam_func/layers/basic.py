"""Linear, embedding, norms and dropout: the small pure layers everything else is made of."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import init as initializers
from ..checks import check_choice
from ..tree import Params

__all__ = ["Linear", "Embedding", "LayerNorm", "RMSNorm", "make_norm", "dropout", "make_weight", "NORMS"]

NORMS = ("layernorm", "rmsnorm")  # what make_norm builds

# the one owner of the named schemes is aam_func.init; layers call it under this name
make_weight = initializers.weight


@dataclass(frozen=True)
class Linear:
    """y = x Wᵀ + b, W (out_features, in_features) as in nn.Linear. (..., in) -> (..., out)."""

    in_features: int
    out_features: int
    bias: bool = True
    weight_init: str = "kaiming_uniform"
    std: float = 0.02

    def init(self, generator: torch.Generator) -> Params:
        w = make_weight((self.out_features, self.in_features), generator, self.weight_init, self.std)
        if not self.bias:
            return {"weight": w}
        if self.weight_init == "kaiming_uniform":  # nn.Linear's default bias
            b = initializers.linear_bias((self.out_features,), self.in_features, generator)
        else:
            b = torch.zeros(self.out_features)
        return {"weight": w, "bias": b}

    def apply(self, params: Params, x: Tensor) -> Tensor:
        return F.linear(x, params["weight"], params.get("bias"))


@dataclass(frozen=True)
class Embedding:
    """Token table lookup, weight (num_embeddings, dim). ids (...) -> (..., dim)."""

    num_embeddings: int
    dim: int
    std: float = 0.02

    def init(self, generator: torch.Generator) -> Params:
        return {"weight": initializers.normal((self.num_embeddings, self.dim), generator, std=self.std)}

    def apply(self, params: Params, ids: Tensor) -> Tensor:
        return F.embedding(ids, params["weight"])


@dataclass(frozen=True)
class LayerNorm:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (Ba et al. 2016)."""

    dim: int
    eps: float = 1e-5
    bias: bool = True

    def init(self, generator: torch.Generator | None = None) -> Params:
        p = {"weight": torch.ones(self.dim)}
        if self.bias:
            p["bias"] = torch.zeros(self.dim)
        return p

    def apply(self, params: Params, x: Tensor) -> Tensor:
        w, b = params["weight"], params.get("bias")
        if _vmapped_forward_ad():
            # torch 2.13's fused rule is wrong under vmap over forward-mode AD of its backward
            # (torch.func.hessian = jacfwd(jacrev) of a loss through a LayerNorm whose input
            # depends on the params: errors of order 1, an asymmetric Hessian; pytorch#196700's
            # family). Normalising without affine and scaling after is exact there.
            y = F.layer_norm(x, (self.dim,), None, None, self.eps) * w
            return y if b is None else y + b
        return F.layer_norm(x, (self.dim,), w, b, self.eps)


def _vmapped_forward_ad() -> bool:
    from ..ops._util import forward_ad_active, vmap_active

    return not torch.compiler.is_compiling() and vmap_active() and forward_ad_active()


@dataclass(frozen=True)
class RMSNorm:
    """x / sqrt(mean(x²) + eps) * weight (Zhang & Sennrich 2019), computed in float32 as LLaMA does."""

    dim: int
    eps: float = 1e-6

    def init(self, generator: torch.Generator | None = None) -> Params:
        return {"weight": torch.ones(self.dim)}

    def apply(self, params: Params, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float() if x.element_size() < 4 else x  # upcast half precisions, never downcast
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return params["weight"] * h.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True):
    check_choice("norm", kind, NORMS)
    return LayerNorm(dim, eps, bias) if kind == "layernorm" else RMSNorm(dim, eps)


def dropout(x: Tensor, p: float, *, train: bool, generator: torch.Generator | None = None) -> Tensor:
    """Inverted dropout. Pure given ``generator``; without one it draws from the global RNG, which
    ``vmap(..., randomness="different"|"same")`` controls. Identity when not training or p == 0."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    if not train or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)
