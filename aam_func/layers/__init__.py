"""Pure layers: frozen dataclass specs with ``init(generator) -> Params`` and ``apply(params, ...)``."""

from .attention import SelfAttention
from .basic import Embedding, LayerNorm, Linear, RMSNorm, dropout, make_norm
from .block import Block
from .mlp import MLP, activation
from ..ops.rope import rope
from .positional import LearnablePositions, SinusoidalPositions, sinusoidal_table

__all__ = [
    "Linear", "Embedding", "LayerNorm", "RMSNorm", "make_norm", "dropout", "MLP", "activation",
    "SinusoidalPositions", "LearnablePositions", "sinusoidal_table", "rope",
    "SelfAttention", "Block",
]
