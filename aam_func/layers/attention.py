"""Multi-head self-attention with grouped-query heads, RoPE, and the guide's attention types.

attention_type (``max_relative_position`` = K):
- ``standard``: full (causal) attention.
- ``relative``: Shaw et al. 2018 learned relative key embeddings clipped at distance K.
- ``local``: each query reads the K most recent keys including itself (a sliding window).
- ``sparse``: Child et al. 2019 fixed patterns with stride K (``sparse_pattern`` strided/fixed).
The score computation itself is :func:`aam_func.ops.attention.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from .. import init as initializers
from ..checks import check_choice
from ..ops.attention import BlockMask, RelativeBias, Sparsity, attention
from ..ops.rope import rope
from ..tree import Params
from .basic import Linear

__all__ = ["SelfAttention", "ATTENTION_TYPES", "qkv_sizes"]

ATTENTION_TYPES = ("standard", "relative", "local", "sparse")  # the module docstring says what each is


def qkv_sizes(n_heads: int, n_kv_heads: int, head_dim: int) -> list[int]:
    """How the fused qkv projection's output rows split into q, k and v: ``[H·hd, Hkv·hd, Hkv·hd]``
    (grouped-query attention: Hkv key/value heads, each shared by H/Hkv query heads)."""
    return [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]


@dataclass(frozen=True)
class SelfAttention:
    d_model: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    bias: bool = True
    causal: bool = True
    attention_type: str = "standard"
    backend: str = "auto"
    max_relative_position: int = 32
    sparse_pattern: str = "strided"
    rope: bool = False
    rope_base: float = 10000.0
    rope_layout: str = "half"
    dropout: float = 0.0
    weight_init: str = "normal"
    std: float = 0.02
    out_std: float = 0.02
    qkv_bias: Optional[bool] = None  # None: ``bias``; Qwen2: True with bias=False (q/k/v biases only)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.kv_heads}")
        check_choice("attention_type", self.attention_type, ATTENTION_TYPES)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_sizes(self) -> list[int]:
        return qkv_sizes(self.n_heads, self.kv_heads, self.head_dim)

    def _qkv(self) -> Linear:
        qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
        return Linear(self.d_model, sum(self.qkv_sizes), bias=qkv_bias, weight_init=self.weight_init, std=self.std)

    def _out(self) -> Linear:
        return Linear(self.d_model, self.d_model, bias=self.bias, weight_init=self.weight_init, std=self.out_std)

    def init(self, generator: torch.Generator) -> Params:
        p = {"qkv": self._qkv().init(generator), "out": self._out().init(generator)}
        if self.attention_type == "relative":
            K = self.max_relative_position
            p["rel"] = {"weight": initializers.normal((2 * K + 1, self.head_dim), generator, std=self.std)}
        return p

    def variant(self, params: Params) -> dict:
        """The op's keyword arguments for this attention type."""
        t, K = self.attention_type, self.max_relative_position
        if t == "relative":
            return {"relative_bias": RelativeBias("shaw", params["rel"]["weight"], max_distance=K)}
        if t == "local":
            return {"window": K}
        if t == "sparse":
            return {"sparsity": Sparsity(self.sparse_pattern, stride=K, summary=max(1, K // 8))}
        return {}

    def apply(
        self,
        params: Params,
        x: Tensor,
        *,
        positions: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        train: bool = False,
        generator: Optional[torch.Generator] = None,
        block_mask: Optional[BlockMask] = None,
    ) -> Tensor:
        """x (batch, seq, d_model) -> (batch, seq, d_model).

        ``positions`` (seq,) or (batch, seq) are absolute positions (for RoPE);
        ``key_padding_mask`` (batch, seq) bool, False at padding. ``block_mask`` (from
        :func:`aam_func.ops.attention.create_block_mask`, e.g. a document mask) further
        restricts which keys a query reads; it is built once per batch and shared by the layers.
        The KV-cached form is :meth:`decode`.
        """
        q, k, v = self._project(params, x, positions)
        static = {} if block_mask is None else {"block_mask": block_mask}
        return self._attend(params, q, k, v, key_padding_mask, train, generator, self.backend, **static)

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
        """x (batch, seq, d_model) after a cached prefix -> ``(out (batch, seq, d_model), (k, v))``.

        Two caches. Without ``cache_position``, ``past_kv`` (k, v) each (batch, kv_heads, past,
        head_dim) grows by concatenation (a new pair is returned, the old one is untouched) and
        ``key_padding_mask`` covers past + seq.

        With ``cache_position`` (a 0-d integer tensor) ``past_kv`` is a *static* cache instead:
        buffers (batch, kv_heads, max_len, head_dim) whose slots ``[0, cache_position)`` hold the
        past. The new keys and values go to slots ``cache_position + [0, seq)`` of a copy (or,
        with ``write_in_place``, of the buffers themselves, for a caller that owns them), the
        queries read slots up to their own (causal), and ``key_padding_mask`` covers max_len.
        Shapes stay fixed from step to step, so a compiled decode step never recompiles.
        """
        q, k, v = self._project(params, x, positions)
        if cache_position is None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
            out = self._attend(params, q, k, v, key_padding_mask, train, generator, self.backend)
            return out, (k, v)
        slots = cache_position + torch.arange(k.shape[2], device=k.device)  # (T,)
        if write_in_place:
            k = past_kv[0].index_copy_(2, slots, k)
            v = past_kv[1].index_copy_(2, slots, v)
        else:
            k = past_kv[0].index_copy(2, slots, k)
            v = past_kv[1].index_copy(2, slots, v)
        backend = self.backend if self.backend in ("math", "sdpa") else "auto"  # the dense paths take q_offset
        out = self._attend(params, q, k, v, key_padding_mask, train, generator, backend, q_offset=cache_position)
        return out, (k, v)

    def _project(self, params: Params, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d_model) -> q (B, H, T, hd), k and v (B, Hkv, T, hd), RoPE applied."""
        H, Hkv = self.n_heads, self.kv_heads
        qkv = self._qkv().apply(params["qkv"], x)  # (B, T, (H + 2 Hkv) hd)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", h=H)
        k = rearrange(k, "b t (h d) -> b h t d", h=Hkv)
        v = rearrange(v, "b t (h d) -> b h t d", h=Hkv)
        if self.rope:
            q = rope(q, positions, base=self.rope_base, layout=self.rope_layout)
            k = rope(k, positions, base=self.rope_base, layout=self.rope_layout)
        return q, k, v

    def _attend(self, params: Params, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                train: bool, generator: Optional[torch.Generator], backend: str, **static) -> Tensor:
        """Scores over q (B, H, T, hd) and k, v (B, Hkv, S, hd), then the output projection -> (B, T, d_model)."""
        o = attention(
            q, k, v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if train else 0.0,
            generator=generator,
            backend=backend,
            **static,
            **self.variant(params),
        )  # (B, H, T, hd)
        return self._out().apply(params["out"], rearrange(o, "b h t d -> b t (h d)"))
