"""aam_func: a functional, JAX-style transformer and LLM toolkit on torch.func."""

from . import tree
from .tree import Params

__version__ = "0.1.0"
from . import init, layers, losses, ops
from .config import ModelConfig
from .model import Transformer
from . import nn
from .nn import bind
