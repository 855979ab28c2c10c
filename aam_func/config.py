"""ModelConfig: every field of the guide's Model Configuration, plus GPT-2 and LLaMA shapes.

A config is validated when it is built; a bad value or combination is a ``ValueError`` naming
the field and the value. Configs are frozen: use :meth:`ModelConfig.replace` for variants.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from .checks import check_bool, check_choice, check_int, check_number
from .init import WEIGHT_INITS
# each tuple of names is owned by the code that dispatches on it; config re-exports them
from .layers.attention import ATTENTION_TYPES
from .layers.basic import NORMS
from .layers.mlp import ACTIVATIONS
from .ops.attention import BACKENDS as ATTENTION_BACKENDS
from .ops.attention.masks import SPARSE_PATTERNS
from .ops.rope import LAYOUTS as ROPE_LAYOUTS

POSITION_ENCODINGS = ("sinusoidal", "learnable", "rope", "none")


@dataclass(frozen=True)
class ModelConfig:
    # --- architecture (the guide's names) ---
    vocab_size: int = 50257
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    d_ff: Optional[int] = None  # None: 4 * d_model (swiglu: 8/3 * d_model rounded up to 8)
    max_seq_len: int = 512
    dropout: float = 0.1
    activation: str = "gelu"
    # --- attention and positions (the guide's flags) ---
    use_relative_pos: bool = False
    use_rope: bool = False
    use_flash_attention: bool = False
    use_xformers: bool = False
    # --- training options (the guide's) ---
    gradient_checkpointing: bool = False
    mixed_precision: bool = False
    weight_decay: float = 0.01
    learning_rate: float = 1e-4
    warmup_steps: int = 1000
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    focal_loss_alpha: float = 1.0
    focal_loss_gamma: float = 0.0  # 0: plain cross-entropy in the LM loss
    # --- the explicit forms the guide's flags map onto ---
    attention_type: Optional[str] = None  # None: "relative" if use_relative_pos else "standard"
    attention_backend: Optional[str] = None  # None: from use_flash_attention / use_xformers, else "auto"
    max_relative_position: int = 32  # relative: clip distance; local: window; sparse: stride
    sparse_pattern: str = "strided"
    position_encoding: Optional[str] = None  # None: "rope" if use_rope else "sinusoidal"
    rope_base: float = 10000.0
    rope_layout: str = "half"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    tie_embeddings: bool = True
    n_kv_heads: Optional[int] = None  # None: n_heads (no grouped-query attention)
    attention_dropout: Optional[float] = None  # None: dropout
    init_std: float = 0.02
    weight_init: str = "normal"  # normal (GPT-2: N(0, init_std), residual outputs / sqrt(2 n_layers)) or the guide's xavier_uniform / kaiming_*
    fused_cross_entropy: bool = True
    qkv_bias: Optional[bool] = None  # None: ``bias``; True with bias=False: biases on q/k/v only (Qwen2)
    document_mask: bool = False  # packed blocks: attend within each document only (issue 20; docs/attention.md)
    eos_token_id: Optional[int] = None  # the token that ends a document (document_mask finds documents by it)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_int(name, getattr(self, name), min=1)
        if self.d_ff is None:
            d_ff = 4 * self.d_model
            if self.activation == "swiglu":
                d_ff = -(-int(8 * self.d_model / 3) // 8) * 8
            set_("d_ff", d_ff)
        check_int("d_ff", self.d_ff, min=1)
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        check_int("n_kv_heads", self.n_kv_heads, min=1)
        check_int("max_relative_position", self.max_relative_position, min=1)
        check_int("warmup_steps", self.warmup_steps, min=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        for name in ("dropout", "label_smoothing"):
            check_number(name, getattr(self, name), min=0, max=1, max_open=True)
        if self.attention_dropout is None:
            set_("attention_dropout", self.dropout)
        check_number("attention_dropout", self.attention_dropout, min=0, max=1, max_open=True)
        for name in ("weight_decay", "learning_rate", "max_grad_norm", "focal_loss_gamma", "init_std"):
            check_number(name, getattr(self, name), min=0)
        check_number("focal_loss_alpha", self.focal_loss_alpha, min=0, min_open=True)
        check_number("norm_eps", self.norm_eps, min=0, min_open=True)
        check_number("rope_base", self.rope_base, min=0, min_open=True)
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias must be a bool or None, got {self.qkv_bias!r}")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        check_choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        check_choice("sparse_pattern", self.sparse_pattern, SPARSE_PATTERNS)
        check_bool("document_mask", self.document_mask)
        check_int("eos_token_id", self.eos_token_id, min=0, max=self.vocab_size - 1, allow_none=True)

        self._resolve_flag("use_relative_pos", "attention_type", "relative", "standard", ATTENTION_TYPES)
        self._resolve_flag("use_rope", "position_encoding", "rope", "sinusoidal", POSITION_ENCODINGS)
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"position_encoding='rope' needs an even head dim, got d_model/n_heads={self.head_dim}")
        # attention_backend <-> use_flash_attention / use_xformers
        if self.use_flash_attention and self.use_xformers:
            raise ValueError("use_flash_attention and use_xformers are both True; choose one")
        if self.attention_backend is None:
            backend = "auto"
            if self.use_flash_attention:
                backend = "blockwise"
            elif self.use_xformers:
                backend = "xformers"
            set_("attention_backend", backend)
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.use_xformers and self.attention_backend != "xformers":
            raise ValueError(
                f"use_xformers=True conflicts with attention_backend={self.attention_backend!r}"
            )
        if self.use_flash_attention and self.attention_backend not in ("blockwise", "sdpa"):
            raise ValueError(
                f"use_flash_attention=True conflicts with attention_backend={self.attention_backend!r}; "
                "flash-style attention is 'blockwise' (or 'sdpa')"
            )
        if self.document_mask and self.attention_backend in ("sdpa", "xformers", "triton"):
            raise ValueError(f"document_mask=True needs attention_backend 'auto', 'blockwise' or 'math' (a mask_mod), "
                             f"got {self.attention_backend!r}")

    def _resolve_flag(self, flag: str, name: str, implied: str, default: str, choices: tuple) -> None:
        """The explicit field ``name`` behind one of the guide's bool flags: unset, it is
        ``implied`` when the flag is on, else ``default``; set, it must agree with the flag."""
        on, value = getattr(self, flag), getattr(self, name)
        if value is None:
            value = implied if on else default
            object.__setattr__(self, name, value)
        check_choice(name, value, choices)
        if on and value != implied:
            raise ValueError(f"{flag}=True conflicts with {name}={value!r}; set {name}={implied!r} or {flag}=False")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        """A new validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if d.get("extra") == {}:  # configs saved before the unused ``extra`` field was removed
            d = {k: v for k, v in d.items() if k != "extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
