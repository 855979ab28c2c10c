"""The Transformer spec: a decoder-only language model (GPT-2 and LLaMA shaped configs).

    model = Transformer(cfg)
    params = model.init(seed=0)
    out = model.apply(params, input_ids, labels=input_ids)   # {"logits", "loss"}
    out = model.decode(params, new_ids, past_kv)              # KV-cached: {"logits", "loss", "past_kv"}

Params layout (flattened names equal a state_dict):
    embed.weight (V, d) · pos.weight (max_seq_len, d) when learnable ·
    blocks.{i}.ln1.* · blocks.{i}.attn.qkv.{weight,bias} · blocks.{i}.attn.out.* ·
    blocks.{i}.attn.rel.weight (relative) · blocks.{i}.ln2.* · blocks.{i}.mlp.{fc,proj | gate,up,down}.* ·
    ln_f.* · lm_head.weight (untied only)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .init import abstract, generator as make_generator
from .layers import (
    MLP,
    Block,
    Embedding,
    LearnablePositions,
    SelfAttention,
    SinusoidalPositions,
    dropout,
    make_norm,
)
from .losses import lm_loss, mask_document_starts, shift_labels
from .ops._util import values_inspectable
from .ops.cross_entropy import IGNORE_INDEX, check_class_ids, linear_cross_entropy
from .ops.attention import create_block_mask
from .ops.attention.mods import document, document_positions
from .ops.attention.mods import document_ids as document_ids_of
from .ops.remat import remat
from .tree import Params, check_structure, flatten, unflatten

__all__ = ["Transformer", "key_padding_mask"]


@dataclass(frozen=True)
class Transformer:
    cfg: ModelConfig

    def __post_init__(self):
        if not isinstance(self.cfg, ModelConfig):
            raise TypeError(f"Transformer needs a ModelConfig, got {type(self.cfg).__name__}")

    # ----------------------------------------------------------------- specs
    @property
    def embedding(self) -> Embedding:
        return Embedding(self.cfg.vocab_size, self.cfg.d_model, std=self.cfg.init_std)

    @property
    def positions(self):
        c = self.cfg
        if c.position_encoding == "learnable":
            return LearnablePositions(c.d_model, c.max_seq_len, std=c.init_std)
        if c.position_encoding == "sinusoidal":
            return SinusoidalPositions(c.d_model, c.max_seq_len)
        return None  # rope (inside attention) or none

    @property
    def block(self) -> Block:
        c = self.cfg
        out_std = c.init_std / math.sqrt(2 * c.n_layers)
        attn = SelfAttention(
            d_model=c.d_model,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            bias=c.bias,
            causal=True,
            attention_type=c.attention_type,
            backend=c.attention_backend,
            max_relative_position=c.max_relative_position,
            sparse_pattern=c.sparse_pattern,
            rope=c.position_encoding == "rope",
            rope_base=c.rope_base,
            rope_layout=c.rope_layout,
            dropout=c.attention_dropout,
            weight_init=c.weight_init,
            std=c.init_std,
            out_std=out_std,
            qkv_bias=c.qkv_bias,
        )
        mlp = MLP(c.d_model, c.d_ff, kind=c.activation, bias=c.bias, weight_init=c.weight_init, std=c.init_std, out_std=out_std)
        return Block(attn, mlp, norm=c.norm, norm_eps=c.norm_eps, norm_bias=c.bias, resid_dropout=c.dropout)

    @property
    def final_norm(self):
        return make_norm(self.cfg.norm, self.cfg.d_model, self.cfg.norm_eps, self.cfg.bias)

    # ------------------------------------------------------------------ init
    def init(
        self, seed: Optional[int] = None, *, generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None
    ) -> Params:
        """Fresh Params; the same seed gives the same tensors on every run."""
        if (seed is None) == (generator is None):
            raise ValueError("Transformer.init takes exactly one of seed=... or generator=...")
        g = make_generator(seed if generator is None else generator)
        c = self.cfg
        params: Params = {"embed": self.embedding.init(g)}
        pos = self.positions
        if isinstance(pos, LearnablePositions):
            params["pos"] = pos.init(g)
        block = self.block
        params["blocks"] = {str(i): block.init(g) for i in range(c.n_layers)}
        params["ln_f"] = self.final_norm.init(g)
        if not c.tie_embeddings:
            params["lm_head"] = {"weight": self.embedding.init(g)["weight"]}
        if dtype is not None:
            params = {k: v for k, v in _cast(params, dtype).items()}
        return params

    def param_shapes(self) -> Params:
        """The expected structure: a tree of shapes (torch.Size), computed without sampling."""
        return unflatten(dict(_flat_shapes(self.cfg)))

    def check_params(self, params: Params) -> None:
        """Raise one ValueError listing missing, unexpected and mis-shaped params."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a nested dict of tensors, got {type(params).__name__}")
        expected = _flat_shapes(self.cfg)
        flat = flatten(params)
        if len(flat) == len(expected) and all(
            k in flat and isinstance(flat[k], Tensor) and tuple(flat[k].shape) == s for k, s in expected
        ):
            return
        check_structure(self.param_shapes(), params, what="params")
        raise TypeError("params leaves must all be tensors")

    # ------------------------------------------------------------------ apply
    def embed(self, params: Params, input_ids: Tensor) -> Tensor:
        """Token embeddings (batch, seq, d_model), before positions are added."""
        self._check_ids(input_ids)
        return self.embedding.apply(params["embed"], input_ids)

    def apply(
        self,
        params: Params,
        input_ids: Optional[Tensor] = None,
        *,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        train: bool = False,
        generator: Optional[torch.Generator] = None,
        inputs_embeds: Optional[Tensor] = None,
        return_logits: bool = True,
        validate: bool = True,
        document_ids: Optional[Tensor] = None,
    ) -> dict:
        """input_ids (batch, seq) -> {"logits": (batch, seq, vocab), "loss": scalar or None}.

        Document masking (packed blocks; docs/attention.md): with ``document_ids`` (batch, seq)
        integers, or with ``cfg.document_mask`` (documents found by ``cfg.eos_token_id``), each
        token attends only to its own document, positions restart at 0 per document (unless
        ``position_ids`` are given), and the cross-document target at each boundary counts in
        no loss.

        ``attention_mask`` (batch, seq): 1/True for real tokens, 0 for padding; padded positions
        neither influence other positions nor count in the loss. ``labels`` (batch, seq) are
        shifted inside (position t predicts labels[t+1]); -100 is ignored. ``inputs_embeds``
        replaces ``input_ids`` (P-tuning). ``position_ids`` (seq,) or (batch, seq) default to
        0 .. seq - 1.

        ``validate=False`` skips the checks that cost time on every call (the params tree
        against the config, and value checks on ids, masks and positions, each a device sync);
        for loops that validated their inputs once up front. Shape checks stay.

        ``return_logits=False`` (with labels) skips the (batch, seq, vocab) logits: the loss then
        comes from the fused, chunked LM-head cross-entropy (``ops.cross_entropy``) unless
        ``cfg.fused_cross_entropy`` is off or the focal loss is configured; ``"logits"`` is None.
        With ``cfg.gradient_checkpointing`` each block is rematerialised in the backward
        (``ops.remat``; works under ``torch.func.grad`` and ``vmap``).

        KV-cached decoding is :meth:`decode`.
        """
        c = self.cfg
        x = self._inputs(params, input_ids, inputs_embeds, validate)  # (B, T, d)
        B, T = x.shape[0], x.shape[1]
        self._check_length(T)
        key_mask = key_padding_mask(attention_mask, B, T, validate)  # (B, T) bool or None
        docs = self._documents(document_ids, input_ids, B, T)  # (B, T) int or None
        if docs is not None and position_ids is None:
            position_ids = document_positions(docs)  # positions restart per document
        positions = self._positions(position_ids, B, T, 0, x.device, validate)
        x = self._add_positions(params, x, positions, train, generator)
        block = self.block
        block_fn = remat(block.apply) if c.gradient_checkpointing and torch.is_grad_enabled() else block.apply
        # the document mask's tile plan, built once for every layer (and their backward)
        doc_mask = {} if docs is None else {"block_mask": create_block_mask(document(docs), B, 1, T, T, x.device)}
        for i in range(c.n_layers):
            x = block_fn(params["blocks"][str(i)], x, positions=positions, key_padding_mask=key_mask,
                         train=train, generator=generator, **doc_mask)
        x = self.final_norm.apply(params["ln_f"], x)  # (B, T, d)
        return self._head(params, x, labels, key_mask, return_logits, docs)

    __call__ = apply

    def decode(
        self,
        params: Params,
        input_ids: Optional[Tensor],
        past_kv: list,
        *,
        cache_position: Optional[Tensor] = None,
        write_in_place: bool = False,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        train: bool = False,
        generator: Optional[torch.Generator] = None,
        inputs_embeds: Optional[Tensor] = None,
        return_logits: bool = True,
        validate: bool = True,
    ) -> dict:
        """New tokens (batch, seq) after a cached prefix -> {"logits", "loss", "past_kv"}.

        The logits (and loss) equal those of :meth:`apply` over the whole sequence at the new
        positions; ``past_kv`` in the output is the cache grown by the new tokens (prefill is a
        call on an empty cache). Two kinds of cache, per layer a (k, v) pair:

        - dynamic (no ``cache_position``): k, v (batch, kv_heads, past, head_dim); the new keys
          and values are concatenated (new tensors, the input is untouched), ``attention_mask``
          covers past + seq, positions default to past .. past + seq - 1.
        - static (``cache_position``, a 0-d integer tensor): buffers (batch, kv_heads, max_len,
          head_dim), the new tokens written at slots ``cache_position + [0, seq)`` of copies, or
          of the buffers themselves with ``write_in_place`` (for a caller that owns them);
          ``attention_mask`` covers the max_len slots (slots beyond the written ones are never
          read), positions default to the slot numbers. Shapes do not change from step to step
          (``torch.compile`` friendly).

        The other arguments are :meth:`apply`'s.
        """
        c = self.cfg
        x = self._inputs(params, input_ids, inputs_embeds, validate)  # (B, T, d)
        B, T = x.shape[0], x.shape[1]
        total = self._check_cache(past_kv, cache_position, T, validate)
        self._check_length(total)
        key_mask = key_padding_mask(attention_mask, B, total, validate)  # (B, total) bool or None
        start = total - T if cache_position is None else cache_position
        positions = self._positions(position_ids, B, T, start, x.device, validate)
        x = self._add_positions(params, x, positions, train, generator)
        block, new_kv = self.block, []
        for i in range(c.n_layers):
            x, kv = block.decode(params["blocks"][str(i)], x, past_kv[i], positions=positions,
                                 key_padding_mask=key_mask, cache_position=cache_position,
                                 write_in_place=write_in_place, train=train, generator=generator)
            new_kv.append(kv)
        x = self.final_norm.apply(params["ln_f"], x)  # (B, T, d)
        if key_mask is None:
            query_mask = None
        elif cache_position is None:
            query_mask = key_mask[:, total - T:]
        else:
            query_mask = key_mask.index_select(1, torch.arange(T, device=x.device) + cache_position)
        out = self._head(params, x, labels, query_mask, return_logits)
        out["past_kv"] = new_kv
        return out

    # ------------------------------------------------------- apply's stages
    def _inputs(self, params: Params, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                validate: bool) -> Tensor:
        """The params check (when validating) and the token embeddings (batch, seq, d_model)."""
        if validate and not torch.compiler.is_compiling():
            self.check_params(params)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            return self.embed(params, input_ids) if validate else self.embedding.apply(params["embed"], input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"inputs_embeds must be (batch, seq, d_model={self.cfg.d_model}), got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _positions(self, position_ids: Optional[Tensor], B: int, T: int, start, device, validate: bool) -> Tensor:
        """``position_ids`` checked, or the default ``start + [0, T)`` (start: an int or a 0-d tensor)."""
        if position_ids is None:
            return torch.arange(T, device=device) + start
        return self._check_positions(position_ids, B, T, validate)

    def _add_positions(self, params: Params, x: Tensor, positions: Tensor, train: bool,
                       generator: Optional[torch.Generator]) -> Tensor:
        """Absolute position encodings (learnable or sinusoidal; rope lives in attention), then dropout."""
        pos = self.positions
        if pos is not None:
            x = pos.apply(params.get("pos", {}), x, positions)
        return dropout(x, self.cfg.dropout, train=train, generator=generator)

    def _documents(self, document_ids: Optional[Tensor], input_ids: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
        """The (B, T) document ids in force: those given, else (with ``cfg.document_mask`` and an
        eos token) the documents of ``input_ids``, else None (one document)."""
        c = self.cfg
        if document_ids is None:
            if not c.document_mask or c.eos_token_id is None or input_ids is None:
                return None
            return document_ids_of(input_ids, c.eos_token_id)
        if not isinstance(document_ids, Tensor) or document_ids.is_floating_point() or document_ids.dtype == torch.bool:
            raise TypeError(f"document_ids must be an integer tensor (batch, seq), got "
                            f"{document_ids.dtype if isinstance(document_ids, Tensor) else type(document_ids).__name__}")
        if tuple(document_ids.shape) != (B, T):
            raise ValueError(f"document_ids must have shape (batch, seq) = {(B, T)}, got {tuple(document_ids.shape)}")
        return document_ids

    def _head(self, params: Params, x: Tensor, labels: Optional[Tensor], query_mask: Optional[Tensor],
              return_logits: bool, docs: Optional[Tensor] = None) -> dict:
        """Final hidden states (B, T, d) -> {"logits": (B, T, V) or None, "loss"}; ``query_mask``
        (B, T) marks the positions whose next token counts in the loss."""
        c = self.cfg
        head = params["embed"]["weight"] if c.tie_embeddings else params["lm_head"]["weight"]
        focal = c.focal_loss_gamma != 0.0 or c.focal_loss_alpha != 1.0
        fused = labels is not None and not return_logits and c.fused_cross_entropy and not focal
        logits = None if fused or not (return_logits or labels is not None) else F.linear(x, head)  # (B, T, V)
        out = {"logits": logits if return_logits else None, "loss": None}
        if labels is None:
            return out
        self._check_labels(labels, x.shape[0], x.shape[1])
        if docs is not None:  # the cross-document target at each boundary counts in no loss
            labels = mask_document_starts(labels, docs)
        targets = shift_labels(labels, query_mask)
        if fused:
            out["loss"] = linear_cross_entropy(x, head, targets, label_smoothing=c.label_smoothing)
        else:
            out["loss"] = lm_loss(
                logits, targets, label_smoothing=c.label_smoothing,
                focal_alpha=c.focal_loss_alpha, focal_gamma=c.focal_loss_gamma,
            )
        return out

    # ------------------------------------------------------------- validation
    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if values_inspectable() and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids contains token id {bad}, outside [0, vocab_size={self.cfg.vocab_size})")

    def _check_length(self, total: int) -> None:
        if total > self.cfg.max_seq_len:
            raise ValueError(f"input has {total} positions but max_seq_len is {self.cfg.max_seq_len}")

    def _check_cache(self, past_kv: list, cache_position: Optional[Tensor], T: int, validate: bool) -> int:
        """Shape checks of a cache (and, when validating, of a static cache's position); returns
        the key length the attention mask covers: past + T (dynamic) or max_len (static)."""
        if past_kv is None:
            raise ValueError(
                "decode needs past_kv: per layer (k, v), each (batch, kv_heads, past, head_dim) "
                "or, with cache_position, static buffers (batch, kv_heads, max_len, head_dim)"
            )
        if len(past_kv) != self.cfg.n_layers:
            raise ValueError(f"past_kv must have one (k, v) per layer ({self.cfg.n_layers}), got {len(past_kv)}")
        if cache_position is None:
            return past_kv[0][0].shape[2] + T
        if not isinstance(cache_position, Tensor) or cache_position.dim() != 0 or cache_position.is_floating_point():
            raise TypeError(f"cache_position must be a 0-d integer tensor, got {cache_position!r}")
        max_len = past_kv[0][0].shape[2]
        if validate and values_inspectable():
            pos = int(cache_position)
            if pos < 0 or pos + T > max_len:
                raise ValueError(f"cache_position {pos} + {T} new tokens does not fit a static cache of {max_len} slots")
        return max_len

    def _check_positions(self, position_ids: Tensor, B: int, T: int, validate: bool = True) -> Tensor:
        if position_ids.is_floating_point():
            raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        if tuple(position_ids.shape) not in ((T,), (B, T)):
            raise ValueError(f"position_ids must be (seq,) or (batch, seq) = {(B, T)}, got {tuple(position_ids.shape)}")
        if validate and values_inspectable() and position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= self.cfg.max_seq_len:
                raise ValueError(f"position_ids must lie in [0, max_seq_len={self.cfg.max_seq_len}), got {lo}..{hi}")
        return position_ids

    def _check_labels(self, labels: Tensor, B: int, T: int) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have shape (batch, seq) = {(B, T)}, got {tuple(labels.shape)}")
        check_class_ids("labels", labels, self.cfg.vocab_size, IGNORE_INDEX, classes="vocab_size")


def key_padding_mask(attention_mask: Optional[Tensor], batch: int, total: int, validate: bool = True) -> Optional[Tensor]:
    """A user's ``attention_mask`` (batch, total) -> the key padding mask the attention takes:
    bool, True at real tokens, False at padding (``None`` stays ``None``).

    The mask must be a Tensor of exactly (batch, total), either bool or holding only 0 and 1
    (any other value is an error rather than silently "true"). ``validate=False``, and tracing
    under ``vmap`` or ``torch.compile``, skip the value check (a device sync); the shape check stays.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, total):
        raise ValueError(
            f"attention_mask must be (batch, seq) = {(batch, total)} in shape, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if validate and values_inspectable() and attention_mask.numel():
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (or be bool)")
    return attention_mask != 0


@functools.lru_cache(maxsize=64)
def _flat_shapes(cfg: ModelConfig) -> tuple:
    """((name, shape), ...) of a config's params, from an abstract init (no sampling)."""
    with abstract():  # no sampling; also outside functorch, where vmap forbids random ops
        p = Transformer(cfg).init(generator=torch.Generator())
    return tuple((k, tuple(v.shape)) for k, v in flatten(p).items())


def _cast(params: Params, dtype: torch.dtype) -> Params:
    from .tree import cast

    return cast(params, dtype)
