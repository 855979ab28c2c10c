"""The guide's layers (positional encoding, multi-head attention, P-tuning) as bound specs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..init import generator as _make_generator
from ..model import key_padding_mask
from ..layers import LearnablePositions, SelfAttention, SinusoidalPositions, dropout as _dropout
from ..ops.rope import rope as _rope
from ..peft import ptuning as _ptuning
from .base import Thin, draw_seed, install_views

__all__ = ["AdvancedPositionalEncoding", "AdvancedMultiHeadAttention", "P_TuningLayer"]


# ----------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class _PositionalEncoding:
    """The guide's positional encoding as a spec over the core ones (no new math)."""

    d_model: int
    max_len: int
    dropout: float
    encoding_type: str
    use_learnable: bool

    def __post_init__(self):
        if self.encoding_type not in ("sinusoidal", "learnable", "rope"):
            raise ValueError(f"encoding_type must be 'sinusoidal', 'learnable' or 'rope', got {self.encoding_type!r}")
        if self.encoding_type == "learnable" and not self.use_learnable:
            raise ValueError("encoding_type='learnable' with use_learnable=False: a learnable encoding is learnable; "
                             "use encoding_type='sinusoidal' for a fixed one")
        if self.encoding_type == "rope" and self.d_model % 2:
            raise ValueError(f"encoding_type='rope' rotates pairs of features and needs an even d_model, got {self.d_model}")

    @property
    def table(self):
        if self.encoding_type == "sinusoidal":
            if self.use_learnable:  # a learned table that starts as the sinusoids
                return LearnablePositions(self.d_model, self.max_len, weight_init="sinusoidal")
            return SinusoidalPositions(self.d_model, self.max_len)
        if self.encoding_type == "learnable":
            return LearnablePositions(self.d_model, self.max_len)
        return None  # rope has no parameters

    def init(self, generator: torch.Generator):
        return self.table.init(generator) if self.table is not None else {}

    def apply(self, params, x: Tensor, *, train: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """x (seq, d_model) or (batch, seq, d_model) -> the same shape, positions 0..seq-1."""
        if not isinstance(x, Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (seq, d_model={self.d_model}) or (batch, seq, d_model), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        unbatched = x.dim() == 2
        if unbatched:
            x = x[None]
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"x has {T} positions but max_len is {self.max_len}")
        positions = torch.arange(T, device=x.device)
        if self.encoding_type == "rope":
            y = _rope(x[:, None], positions)[:, 0]  # a one-head view (batch, 1, seq, d)
        else:
            y = self.table.apply(params, x, positions)
        y = _dropout(y, self.dropout, train=train, generator=generator)
        return y[0] if unbatched else y


class AdvancedPositionalEncoding(Thin):
    """The guide's ``AdvancedPositionalEncoding``: sinusoidal (with ``use_learnable``: a learned
    table initialised to the sinusoids), learnable (N(0, 0.02) table), or rope (rotates feature
    pairs; no parameters, ``use_learnable`` has no effect). Input (seq, d) or (batch, seq, d)."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.1, encoding_type: str = "sinusoidal",
                 use_learnable: bool = False, *, seed: Optional[int] = None):
        spec = _PositionalEncoding(d_model, max_len, float(dropout), encoding_type, bool(use_learnable))
        super().__init__(spec, spec.init(_make_generator(draw_seed(seed))))

    def forward(self, x: Tensor) -> Tensor:
        return self.spec.apply(self.params(), x, train=self.training)


# ----------------------------------------------------------------------------- attention


class AdvancedMultiHeadAttention(Thin):
    """The guide's ``AdvancedMultiHeadAttention`` over :class:`aam_func.layers.SelfAttention`.

    x (batch, seq, d_model) -> (batch, seq, d_model); encoder-style (``causal=False``) by default
    as in the guide's example. ``attention_type``: standard, relative (clip distance
    ``max_relative_position``), local (window), sparse (stride). ``use_flash_attention`` selects
    the flash-style "blockwise" kernel, ``use_xformers`` the xformers one (an ``ImportError`` when
    xformers is not installed). Weights start xavier-uniform with zero biases, as the guide's
    layer-specific initialisation; ``qkv`` is one fused projection (q, k, v stacked on dim 0).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1, attention_type: str = "standard",
                 max_relative_position: int = 32, use_flash_attention: bool = False, use_xformers: bool = False,
                 *, causal: bool = False, sparse_pattern: str = "strided", seed: Optional[int] = None):
        if use_flash_attention and use_xformers:
            raise ValueError("use_flash_attention and use_xformers are both True; choose one")
        if use_xformers and importlib.util.find_spec("xformers") is None:
            raise ImportError(
                "use_xformers=True needs the 'xformers' package (pip install xformers), which is not installed; "
                "use use_flash_attention=True for memory-efficient attention without it"
            )
        backend = "blockwise" if use_flash_attention else "xformers" if use_xformers else "auto"
        spec = SelfAttention(
            d_model=d_model, n_heads=n_heads, causal=causal, attention_type=attention_type, backend=backend,
            max_relative_position=max_relative_position, sparse_pattern=sparse_pattern, dropout=float(dropout),
            weight_init="xavier_uniform",
        )
        super().__init__(spec, spec.init(_make_generator(draw_seed(seed))))
        install_views(self)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, d_model), got {tuple(getattr(x, 'shape', ()))}")
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device)
        kpm = key_padding_mask(attention_mask, B, T)
        return self.spec.apply(self.params(), x, positions=positions, key_padding_mask=kpm, train=self.training)


# ----------------------------------------------------------------------------- P-tuning


@dataclass(frozen=True)
class _PTuning:
    d_model: int
    prompt_length: int
    dropout: float
    encoder: Optional[str]

    def init(self, generator: torch.Generator):
        return _ptuning.init(self.d_model, self.prompt_length, self.encoder, generator=generator)

    def apply(self, params, x: Tensor, *, train: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        return _ptuning.apply(params, x, train=train, dropout=self.dropout, generator=generator)["inputs_embeds"]


class P_TuningLayer(Thin):
    """The guide's ``P_TuningLayer``: prepends ``prompt_length`` learned virtual tokens to
    embeddings (batch, seq, d) -> (batch, prompt_length + seq, d), through
    :mod:`aam_func.peft.ptuning` (PEFT's PromptEncoder: ``encoder="mlp"``, ``"lstm"`` or ``None``).
    :meth:`AdvancedTransformerModel.forward_with_embeddings` extends a (batch, seq) attention mask
    and labels over the prompt."""

    def __init__(self, d_model: int, prompt_length: int = 10, dropout: float = 0.1, encoder: Optional[str] = "mlp",
                 *, seed: Optional[int] = None):
        spec = _PTuning(d_model, prompt_length, float(dropout), encoder)
        super().__init__(spec, spec.init(_make_generator(draw_seed(seed))))

    @property
    def prompt_length(self) -> int:
        return self.spec.prompt_length

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.spec.apply(self.params(), embeddings, train=self.training)
