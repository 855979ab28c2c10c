"""The pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..tree import Params
from .attention import SelfAttention
from .basic import dropout, make_norm
from .mlp import MLP

__all__ = ["Block"]


@dataclass(frozen=True)
class Block:
    attn: SelfAttention
    mlp: MLP
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    resid_dropout: float = 0.0

    def _norm(self):
        return make_norm(self.norm, self.attn.d_model, self.norm_eps, self.norm_bias)

    def init(self, generator: torch.Generator) -> Params:
        return {
            "ln1": self._norm().init(generator),
            "attn": self.attn.init(generator),
            "ln2": self._norm().init(generator),
            "mlp": self.mlp.init(generator),
        }

    def apply(
        self,
        params: Params,
        x: Tensor,
        *,
        positions: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        train: bool = False,
        generator: Optional[torch.Generator] = None,
        past_kv=None,
        cache_position: Optional[Tensor] = None,
        write_in_place: bool = False,
    ):
        """(batch, seq, d_model) -> (batch, seq, d_model); with ``past_kv``, also the new (k, v).

        ``cache_position``/``write_in_place``: a static KV cache (see :meth:`SelfAttention.apply`)."""
        norm = self._norm()
        a = self.attn.apply(
            params["attn"], norm.apply(params["ln1"], x),
            positions=positions, key_padding_mask=key_padding_mask, train=train, generator=generator,
            past_kv=past_kv, cache_position=cache_position, write_in_place=write_in_place,
        )
        if past_kv is not None:
            a, kv = a
        x = x + dropout(a, self.resid_dropout, train=train, generator=generator)
        m = self.mlp.apply(params["mlp"], norm.apply(params["ln2"], x))
        x = x + dropout(m, self.resid_dropout, train=train, generator=generator)
        return (x, kv) if past_kv is not None else x
