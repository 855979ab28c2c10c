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
        block_mask=None,
    ) -> Tensor:
        """(batch, seq, d_model) -> (batch, seq, d_model). The KV-cached form is :meth:`decode`.
        ``block_mask``: an attention block mask (document masking), passed to the attention."""
        a = self.attn.apply(
            params["attn"], self._norm().apply(params["ln1"], x),
            positions=positions, key_padding_mask=key_padding_mask, train=train, generator=generator,
            **({} if block_mask is None else {"block_mask": block_mask}),
        )
        return self._residuals(params, x, a, train, generator)

    def decode(
        self,
        params: Params,
        x: Tensor,
        past_kv: tuple[Tensor, Tensor],
        *,
        positions: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        cache_position: Optional[Tensor] = None,
        write_in_place: bool = False,
        train: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(batch, seq, d_model) after a cached prefix -> ``(out, (k, v))``: this layer's cache
        grown by the new tokens (the two cache kinds: see :meth:`SelfAttention.decode`)."""
        a, kv = self.attn.decode(
            params["attn"], self._norm().apply(params["ln1"], x), past_kv,
            positions=positions, key_padding_mask=key_padding_mask, cache_position=cache_position,
            write_in_place=write_in_place, train=train, generator=generator,
        )
        return self._residuals(params, x, a, train, generator), kv

    def _residuals(self, params: Params, x: Tensor, a: Tensor, train: bool,
                   generator: Optional[torch.Generator]) -> Tensor:
        """x + drop(a), then + drop(mlp(norm2(.))): the rest of the block once attention ``a`` is known."""
        x = x + dropout(a, self.resid_dropout, train=train, generator=generator)
        m = self.mlp.apply(params["mlp"], self._norm().apply(params["ln2"], x))
        return x + dropout(m, self.resid_dropout, train=train, generator=generator)
