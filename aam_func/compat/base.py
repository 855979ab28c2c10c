"""What every compat module shares: seeds drawn from torch's global RNG, typed views of the
bound params for the guide's init code, and the bound-module base class."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import Bound, Node

__all__ = ["draw_seed", "install_views", "Thin", "LinearView"]


def draw_seed(seed: Optional[int]) -> int:
    """An explicit seed, or one drawn from torch's global RNG so ``torch.manual_seed`` governs
    compat modules as it governs ``nn.Linear``."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# ----------------------------------------------------------------------------- typed views
# bind() makes plain container modules. The guide's init code walks modules by type
# (``isinstance(m, nn.Linear)`` → ``nn.init.xavier_uniform_(m.weight)``), so the containers of a
# Linear's, an Embedding's or a norm's params are swapped for instances of those torch types that
# hold the *same* Parameter objects. Nothing calls their forward: the model's forward stays the
# spec's apply, which reads the parameters by name.


class LinearView(nn.Linear):
    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)


class _EmbeddingView(nn.Embedding):
    def __init__(self, weight: nn.Parameter):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = weight


class _LayerNormView(nn.LayerNorm):
    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], eps: float):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = tuple(weight.shape), eps, True
        self.weight = weight
        self.register_parameter("bias", bias)


class _RMSNormView(nn.RMSNorm):
    def __init__(self, weight: nn.Parameter, eps: float):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = tuple(weight.shape), eps, True
        self.weight = weight


_TABLES = ("embed", "pos", "rel")  # lookup tables of the Transformer/SelfAttention params layout


def install_views(root: nn.Module, norm: str = "layernorm", eps: float = 1e-5) -> None:
    for name, node in list(root.named_modules()):
        if type(node) is not Node or not name:
            continue
        params = dict(node.named_parameters(recurse=False))
        if next(node.children(), None) is not None or not params or set(params) - {"weight", "bias"}:
            continue
        w, b = params.get("weight"), params.get("bias")
        if w is None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if w.dim() == 2 and leaf in _TABLES and b is None:
            view = _EmbeddingView(w)
        elif w.dim() == 2:
            view = LinearView(w, b)
        elif w.dim() == 1 and (norm == "layernorm" or b is not None):
            view = _LayerNormView(w, b, eps)
        elif w.dim() == 1:
            view = _RMSNormView(w, eps)
        else:
            continue
        parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
        parent._modules[leaf] = view  # same key, same place: names and order are unchanged


class Thin(Bound):
    """A bound spec whose ``torch.jit.script`` fails with the right call."""

    def __prepare_scriptable__(self):
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward is a pure function of "
            "a params dict (aam_func's functional core), which TorchScript does not support. "
            "Use torch.compile(model) instead (it traces the functional forward)."
        )
