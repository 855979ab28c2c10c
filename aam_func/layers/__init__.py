"""Pure layers: frozen dataclass specs with ``init(generator) -> Params`` and ``apply(params, ...)``."""

from .attention import SelfAttention
from .basic import Embedding, LayerNorm, Linear, RMSNorm, dropout, make_norm
from .block import Block
from .mlp import MLP, activation
from .positional import LearnablePositions, SinusoidalPositions, rope, rope_angles, sinusoidal_table

__all__ = [
    "Linear", "Embedding", "LayerNorm", "RMSNorm", "make_norm", "dropout", "MLP", "activation",
    "SinusoidalPositions", "LearnablePositions", "sinusoidal_table", "rope", "rope_angles",
    "SelfAttention", "Block",
]
