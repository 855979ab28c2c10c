"""The guide's tokenizer and model: :class:`aam_func.tokenizer.Tokenizer` and a bound
:class:`aam_func.Transformer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..config import ModelConfig
from ..model import Transformer
from ..tokenizer import Tokenizer, TokenizerError
from .base import Thin, draw_seed, install_views

__all__ = ["AdvancedTokenizer", "AdvancedTransformerModel"]


# ----------------------------------------------------------------------------- tokenizer


def _is_hf_tokenizer(obj) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except Exception:
        return False
    return isinstance(obj, PreTrainedTokenizerBase)


class AdvancedTokenizer(Tokenizer):
    """The guide's tokenizer over :class:`aam_func.tokenizer.Tokenizer` (transformers, offline).

    ``model_name``: a local tokenizer directory, a name already in the Hugging Face cache (or in
    ``cache_dir``), or a transformers tokenizer object. Nothing is downloaded; a name that is not
    available is a :class:`TokenizerError` saying how to point at a directory or train one
    (:meth:`train`). ``tokenize_text`` returns ``{"input_ids", "attention_mask"}`` (batch, seq).
    """

    def __init__(self, model_name: Any = "gpt2", max_length: Optional[int] = 512, padding: Union[str, bool] = "longest",
                 truncation: bool = True, *, padding_side: str = "right", cache_dir: Optional[str] = None):
        hf = model_name if _is_hf_tokenizer(model_name) else _load_hf(model_name, cache_dir)
        super().__init__(hf, max_length=max_length, padding=padding, truncation=truncation, padding_side=padding_side)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 8192, *, save_dir: Optional[str] = None,
              min_frequency: int = 2, **options) -> "AdvancedTokenizer":
        """A byte-level BPE trained on ``texts`` (:meth:`Tokenizer.train_bpe`), e.g. in place of gpt2 offline."""
        return cls.train_bpe(texts, vocab_size, min_frequency=min_frequency, save_dir=save_dir, **options)

    def __len__(self) -> int:
        return self.vocab_size


def _load_hf(name, cache_dir: Optional[str]):
    if cache_dir is not None:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(name), cache_dir=cache_dir, local_files_only=True,
                                                 trust_remote_code=False)
        except Exception:
            pass  # fall through to the message below
    else:
        try:
            return Tokenizer.load(name).hf
        except TokenizerError as e:
            if "not available offline" not in str(e):  # a bad local directory: its own message
                raise
    raise TokenizerError(
        f"tokenizer {str(name)!r} is not available offline (nothing is downloaded)"
        + (f" and not in cache_dir={cache_dir!r}" if cache_dir else "")
        + ". Point at a local tokenizer directory instead: AdvancedTokenizer('/path/to/tokenizer_dir', ...) "
        "(a directory with tokenizer.json, e.g. written by tokenizer.save_pretrained(dir) where the model is "
        "available), or train one on your texts: AdvancedTokenizer.train(texts, vocab_size=..., max_length=...) "
        "(aam_func.tokenizer.Tokenizer.train_bpe)"
    ) from None


# ----------------------------------------------------------------------------- the model


def _spec_for(cfg: ModelConfig) -> Transformer:
    # cfg.gradient_checkpointing makes Transformer.apply rematerialise each block (ops.remat)
    return Transformer(cfg)


def _extend_front(t: Optional[Tensor], total: int, fill, what: str) -> Optional[Tensor]:
    """A (batch, seq) mask or labels for embeddings of ``total`` >= seq positions whose first
    ``total - seq`` are prepended prompts (P-tuning): ``fill`` in front."""
    if t is None or t.shape[-1] == total:
        return t
    if t.dim() != 2 or t.shape[1] > total:
        raise ValueError(f"{what} must be (batch, seq) with seq <= {total} (the embeddings' length), got {tuple(t.shape)}")
    pad = torch.full((t.shape[0], total - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


class AdvancedTransformerModel(Thin):
    """The guide's model: ``bind(Transformer(config), Transformer(config).init(seed))``.

    ``model(input_ids, attention_mask=None, labels=None)`` -> ``{"logits": (batch, seq, vocab),
    "loss": scalar or None}`` (labels are shifted inside; -100 ignored); dropout follows
    ``model.train()`` / ``model.eval()``. ``named_parameters()`` are the functional Params' names
    (``embed.weight``, ``blocks.0.attn.qkv.weight``, …): ``model.params()`` is the Params tree.
    ``config.gradient_checkpointing`` (or :meth:`gradient_checkpointing_enable`) recomputes each
    block in the backward.
    """

    def __init__(self, config: ModelConfig, *, seed: Optional[int] = None, params=None):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"AdvancedTransformerModel needs a ModelConfig, got {type(config).__name__}")
        spec = _spec_for(config)
        super().__init__(spec, params if params is not None else spec.init(seed=draw_seed(seed)))
        install_views(self, config.norm, config.norm_eps)

    @property
    def config(self) -> ModelConfig:
        return self.spec.cfg

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **kwargs) -> dict:
        kwargs.setdefault("train", self.training)
        return self.spec.apply(self.params(), input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def embedding(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (batch, seq, d_model), before positions (added in the forward)."""
        return self.spec.embed(self.params(), input_ids)

    def forward_with_embeddings(self, inputs_embeds: Tensor, attention_mask: Optional[Tensor] = None,
                                labels: Optional[Tensor] = None, **kwargs) -> dict:
        """The forward from embeddings (batch, seq', d_model). A mask or labels (batch, seq) shorter
        than seq' (prompts prepended by :class:`P_TuningLayer`) gain ones / -100 in front."""
        total = inputs_embeds.shape[1]
        attention_mask = _extend_front(attention_mask, total, 1, "attention_mask")
        labels = _extend_front(labels, total, -100, "labels")
        kwargs.setdefault("train", self.training)
        return self.spec.apply(self.params(), inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               labels=labels, **kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward instead of keeping them
        (:func:`aam_func.ops.remat`: works under eager autograd and ``torch.func.grad``)."""
        object.__setattr__(self, "spec", _spec_for(self.config.replace(gradient_checkpointing=True)))

    def gradient_checkpointing_disable(self) -> None:
        object.__setattr__(self, "spec", _spec_for(self.config.replace(gradient_checkpointing=False)))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.config.gradient_checkpointing

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
