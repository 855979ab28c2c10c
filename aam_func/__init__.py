"""aam_func: a functional, JAX-style transformer and LLM toolkit on torch.func.

    import aam_func as af
    model = af.Transformer(af.ModelConfig(...))
    params = model.init(seed=0)
    out = model.apply(params, input_ids, labels=input_ids)
"""

from . import ensemble, init, layers, losses, nn, ops, optim, per_sample, peft, privacy, tree
from .config import ModelConfig
from .model import Transformer
from .nn import bind
from .ops.remat import remat
from .tree import Params

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Transformer", "Params", "bind", "remat", "tree", "init", "layers", "losses", "nn", "ops", "optim", "peft", "per_sample", "privacy", "ensemble"]
