"""The guide's class API, thin, over the functional core.

Code written against the guide runs with one changed import::

    from aam_func.compat import ModelConfig, AdvancedTransformerModel, AdvancedTrainingPipeline, ...

Every class here is a ``torch.nn.Module`` (or a plain object) made with :func:`aam_func.nn.bind`
over the functional specs, or a forwarding wrapper around ``aam_func.losses``, ``aam_func.optim``,
``aam_func.peft``, ``aam_func.tokenizer``, ``aam_func.train`` and ``aam_func.generate``. There is
no second implementation of any math: a compat module's ``named_parameters()`` are the spec's
Params names, its ``forward`` is the spec's ``apply``, and :class:`AdvancedTrainingPipeline`
runs :func:`aam_func.train.make_train_step` on those very tensors, so a compat run and a
functional run from the same seed end with the same params (tested).

Where the guide's own code is wrong (an integer tensor with ``requires_grad``, ``setattr`` with a
dotted name, GPT-2's ``Conv1D``, a GPT-2 tokenizer feeding a 1000-token model,
``torch.jit.script``), this module gives the intended behaviour or an error naming the right
call; ``docs/compat.md`` lists each case.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import optim, tree
from .config import ModelConfig
from .init import generator as _make_generator
from .layers import LearnablePositions, SelfAttention, SinusoidalPositions, dropout as _dropout
from .losses import contrastive_loss, focal_loss, label_smoothing_loss, triplet_loss
from .model import Transformer
from .nn import Bound, Node
from .ops.rope import rope as _rope
from .peft import lora as _lora
from .peft import ptuning as _ptuning
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "ModelConfig",
    "AdvancedPositionalEncoding",
    "AdvancedMultiHeadAttention",
    "LoRALayer",
    "LoRALinear",
    "apply_lora",
    "P_TuningLayer",
    "AdvancedLossFunctions",
    "AdvancedOptimizers",
    "AdvancedTokenizer",
    "TokenizerError",
    "AdvancedTransformerModel",
    "AdvancedTrainingPipeline",
]


def _seed(seed: Optional[int]) -> int:
    """An explicit seed, or one drawn from torch's global RNG so ``torch.manual_seed`` governs
    compat modules as it governs ``nn.Linear``."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# ----------------------------------------------------------------------------- typed views
# bind() makes plain container modules. The guide's init code walks modules by type
# (``isinstance(m, nn.Linear)`` → ``nn.init.xavier_uniform_(m.weight)``), so the containers of a
# Linear's, an Embedding's or a norm's params are swapped for instances of those torch types that
# hold the *same* Parameter objects. Nothing calls their forward: the model's forward stays the
# spec's apply, which reads the parameters by name.


class _LinearView(nn.Linear):
    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)


class _EmbeddingView(nn.Embedding):
    def __init__(self, weight: nn.Parameter):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = weight


class _LayerNormView(nn.LayerNorm):
    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], eps: float):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = tuple(weight.shape), eps, True
        self.weight = weight
        self.register_parameter("bias", bias)


class _RMSNormView(nn.RMSNorm):
    def __init__(self, weight: nn.Parameter, eps: float):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = tuple(weight.shape), eps, True
        self.weight = weight


_TABLES = ("embed", "pos", "rel")  # lookup tables of the Transformer/SelfAttention params layout


def _install_views(root: nn.Module, norm: str = "layernorm", eps: float = 1e-5) -> None:
    for name, node in list(root.named_modules()):
        if type(node) is not Node or not name:
            continue
        params = dict(node.named_parameters(recurse=False))
        if next(node.children(), None) is not None or not params or set(params) - {"weight", "bias"}:
            continue
        w, b = params.get("weight"), params.get("bias")
        if w is None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if w.dim() == 2 and leaf in _TABLES and b is None:
            view = _EmbeddingView(w)
        elif w.dim() == 2:
            view = _LinearView(w, b)
        elif w.dim() == 1 and (norm == "layernorm" or b is not None):
            view = _LayerNormView(w, b, eps)
        elif w.dim() == 1:
            view = _RMSNormView(w, eps)
        else:
            continue
        parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
        parent._modules[leaf] = view  # same key, same place: names and order are unchanged


class _Thin(Bound):
    """A bound spec whose ``torch.jit.script`` fails with the right call."""

    def __prepare_scriptable__(self):
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward is a pure function of "
            "a params dict (aam_func's functional core), which TorchScript does not support. "
            "Use torch.compile(model) instead (it traces the functional forward)."
        )


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


class AdvancedPositionalEncoding(_Thin):
    """The guide's ``AdvancedPositionalEncoding``: sinusoidal (with ``use_learnable``: a learned
    table initialised to the sinusoids), learnable (N(0, 0.02) table), or rope (rotates feature
    pairs; no parameters, ``use_learnable`` has no effect). Input (seq, d) or (batch, seq, d)."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.1, encoding_type: str = "sinusoidal",
                 use_learnable: bool = False, *, seed: Optional[int] = None):
        spec = _PositionalEncoding(d_model, max_len, float(dropout), encoding_type, bool(use_learnable))
        super().__init__(spec, spec.init(_make_generator(_seed(seed))))

    def forward(self, x: Tensor) -> Tensor:
        return self.spec.apply(self.params(), x, train=self.training)


# ----------------------------------------------------------------------------- attention


def _key_padding_mask(attention_mask: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be (batch, seq) = {(B, T)}, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1 (or be bool)")
    return attention_mask != 0


class AdvancedMultiHeadAttention(_Thin):
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
        super().__init__(spec, spec.init(_make_generator(_seed(seed))))
        _install_views(self)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, d_model), got {tuple(getattr(x, 'shape', ()))}")
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device)
        kpm = _key_padding_mask(attention_mask, B, T)
        return self.spec.apply(self.params(), x, positions=positions, key_padding_mask=kpm, train=self.training)


# ----------------------------------------------------------------------------- LoRA


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


class LoRALayer(nn.Module):
    """The low-rank branch alone: ``s · B · A · drop(x)``, s = alpha / rank, (..., in) -> (..., out).

    ``lora_A`` (rank, in) starts kaiming-uniform and ``lora_B`` (out, rank) at zero (PEFT's
    names and init, from :class:`aam_func.peft.LoRA`), so the branch is 0 until trained."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, *, seed: Optional[int] = None):
        super().__init__()
        self.lora = _lora.LoRA((_lora.Target("lora", in_features, out_features),), rank, float(alpha), float(dropout))
        ab = self.lora.init(_seed(seed))["lora"]
        self.lora_A = nn.Parameter(ab["lora_A"])
        self.lora_B = nn.Parameter(ab["lora_B"])
        # the branch is lora.linear over a zero base weight of one output column (broadcast):
        # the formula stays in aam_func.peft.lora, and the base costs one (..., in) x (in, 1) product.
        self.register_buffer("_zero_base", torch.zeros(in_features, 1), persistent=False)

    @property
    def scaling(self) -> float:
        return self.lora.scale

    def forward(self, x: Tensor) -> Tensor:
        p = self.lora.dropout if self.training else 0.0
        zero = self._zero_base.to(x.dtype)
        return _lora.linear(x, zero, None, self.lora_A, self.lora_B, self.lora.scale, dropout=p, fan_in_fan_out=True)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) plus a LoRA branch:
    ``base(x) + s · B · A · drop(x)`` through :func:`aam_func.peft.lora.linear`. The base layer is
    kept as ``base_layer`` (PEFT's name); ``lora_A``/``lora_B`` are the trainable adapters."""

    def __init__(self, linear: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 *, seed: Optional[int] = None):
        super().__init__()
        conv1d = _conv1d_type()
        if isinstance(linear, (_LinearView,)):
            raise TypeError(
                "this nn.Linear is a view of an aam_func model's functional params: replacing it does not change "
                "the model's forward. Use aam_func.peft.lora: spec, adapters = lora.init(model, targets=[...], "
                "rank=..., alpha=...); out = spec.call(model, adapters, input_ids)"
            )
        if isinstance(linear, nn.Linear):
            fan_in_fan_out, (out_f, in_f) = False, linear.weight.shape
        elif conv1d is not None and isinstance(linear, conv1d):
            fan_in_fan_out, (in_f, out_f) = True, linear.weight.shape
        else:
            raise TypeError(f"LoRALinear wraps an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        self.base_layer = linear
        self.lora = _lora.LoRA((_lora.Target("base_layer", int(in_f), int(out_f), fan_in_fan_out),),
                               rank, float(alpha), float(dropout))
        ab = self.lora.init(_seed(seed), dtype=linear.weight.dtype)["base_layer"]
        self.lora_A = nn.Parameter(ab["lora_A"].to(linear.weight.device))
        self.lora_B = nn.Parameter(ab["lora_B"].to(linear.weight.device))

    @property
    def in_features(self) -> int:
        return self.lora.targets[0].in_features

    @property
    def out_features(self) -> int:
        return self.lora.targets[0].out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def scaling(self) -> float:
        return self.lora.scale

    def forward(self, x: Tensor) -> Tensor:
        t = self.lora.targets[0]
        p = self.lora.dropout if self.training else 0.0
        return _lora.linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                            self.lora.scale, dropout=p, fan_in_fan_out=t.fan_in_fan_out)


def apply_lora(model: nn.Module, targets, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               *, seed: Optional[int] = None) -> list[str]:
    """Replace the ``nn.Linear`` / GPT-2 ``Conv1D`` submodules that ``targets`` selects by
    :class:`LoRALinear` in place, at their dotted place (``model.get_submodule(parent)``, then
    ``setattr(parent, child, ...)``): what the guide's ``setattr(model, name, LoRALinear(module))``
    loop meant. ``targets``: globs, plain names (``"c_fc"`` matches every ``*.c_fc``) or a
    predicate over weight names, resolved by :func:`aam_func.peft.lora.targets_of`. Returns the
    replaced module names. Base weights stay trainable; freeze them as the guide does.
    """
    if isinstance(model, Bound):
        raise TypeError(
            f"apply_lora replaces torch submodules, but {type(model).__name__}'s forward is functional. "
            "Use aam_func.peft.lora: spec, adapters = lora.init(model, targets=[...], rank=..., alpha=...); "
            "out = spec.call(model, adapters, input_ids)"
        )
    found = _lora.targets_of(model, targets)
    base = _seed(seed)
    for i, t in enumerate(found):
        parent_name, _, child = t.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank=rank, alpha=alpha, dropout=dropout, seed=base + i))
    return [t.name for t in found]


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


class P_TuningLayer(_Thin):
    """The guide's ``P_TuningLayer``: prepends ``prompt_length`` learned virtual tokens to
    embeddings (batch, seq, d) -> (batch, prompt_length + seq, d), through
    :mod:`aam_func.peft.ptuning` (PEFT's PromptEncoder: ``encoder="mlp"``, ``"lstm"`` or ``None``).
    :meth:`AdvancedTransformerModel.forward_with_embeddings` extends a (batch, seq) attention mask
    and labels over the prompt."""

    def __init__(self, d_model: int, prompt_length: int = 10, dropout: float = 0.1, encoder: Optional[str] = "mlp",
                 *, seed: Optional[int] = None):
        spec = _PTuning(d_model, prompt_length, float(dropout), encoder)
        super().__init__(spec, spec.init(_make_generator(_seed(seed))))

    @property
    def prompt_length(self) -> int:
        return self.spec.prompt_length

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.spec.apply(self.params(), embeddings, train=self.training)


# ----------------------------------------------------------------------------- losses


class AdvancedLossFunctions:
    """The guide's loss namespace: the functions of :mod:`aam_func.losses`."""

    focal_loss = staticmethod(focal_loss)
    label_smoothing_loss = staticmethod(label_smoothing_loss)
    contrastive_loss = staticmethod(contrastive_loss)
    triplet_loss = staticmethod(triplet_loss)


# ----------------------------------------------------------------------------- optimizers


def _named_trainable(model: Union[nn.Module, Mapping]) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return tree.flatten(model)


def _decay_flags(named: Mapping[str, Tensor]) -> dict[str, bool]:
    return tree.flatten(optim.decay_mask(tree.unflatten(dict(named))))


class AdvancedOptimizers:
    """The guide's optimizer factory: ``torch.optim.AdamW`` with :func:`aam_func.optim.decay_mask`
    groups and a ``LambdaLR`` over :func:`aam_func.optim.warmup_cosine`; :meth:`functional`
    is the same recipe in ``aam_func.optim`` (what :class:`AdvancedTrainingPipeline` runs)."""

    @staticmethod
    def create_optimizer(model: nn.Module, config: ModelConfig) -> torch.optim.AdamW:
        """AdamW(lr=config.learning_rate): ``weight_decay=config.weight_decay`` on linear and
        embedding weights, none on biases and norm parameters. Frozen parameters are left out."""
        named = _named_trainable(model)
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
        flags = _decay_flags(named)
        decay = [p for n, p in named.items() if flags[n]]
        no_decay = [p for n, p in named.items() if not flags[n]]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=config.learning_rate)

    @staticmethod
    def create_scheduler(optimizer: torch.optim.Optimizer, config: ModelConfig,
                         num_training_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warmup over ``config.warmup_steps`` then cosine to 0 at ``num_training_steps``:
        the factor of :func:`aam_func.optim.warmup_cosine` (transformers' cosine-with-warmup)."""
        factor = optim.warmup_cosine(1.0, config.warmup_steps, num_training_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @staticmethod
    def functional(config: ModelConfig, params, num_training_steps: int) -> optim.GradientTransformation:
        """The same recipe for the functional core: global-norm clipping at ``config.max_grad_norm``
        (0: none), then AdamW with the scheduled learning rate and the decay mask of ``params``."""
        return optim.adamw_warmup_cosine(params, learning_rate=config.learning_rate, total_steps=num_training_steps,
                                         warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                                         max_grad_norm=config.max_grad_norm)


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


class AdvancedTransformerModel(_Thin):
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
        super().__init__(spec, params if params is not None else spec.init(seed=_seed(seed)))
        _install_views(self, config.norm, config.norm_eps)

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


# ----------------------------------------------------------------------------- the pipeline


def _tokenizer_size(tokenizer) -> int:
    return len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)


def _check_ids_fit(ids: Tensor, vocab_size: int, tokenizer, what: str) -> None:
    if ids.numel() == 0:
        return
    hi = int(ids.max())
    if hi < vocab_size:
        return
    msg = f"{what} contains token id {hi}, outside the model's vocab_size={vocab_size}"
    if tokenizer is not None:
        n = _tokenizer_size(tokenizer)
        msg += (f"; the tokenizer has {n} tokens (len(tokenizer)). Build the model with "
                f"ModelConfig(vocab_size=len(tokenizer)) (= {n}) or use a tokenizer of at most {vocab_size} tokens")
    raise ValueError(msg)


class AdvancedTrainingPipeline:
    """The guide's pipeline: :func:`aam_func.train.make_train_step` over the model's own tensors.

    Each :meth:`train_step` reads the module's parameters as a Params tree, runs the functional
    step (AdamW + warmup-cosine + clipping from :meth:`AdvancedOptimizers.functional`, dropout
    from a generator seeded by ``seed`` and the step), and writes the new values back into the
    same Parameters, so ``model`` is always current. Returns floats: ``loss``,
    ``learning_rate`` (the rate this step used), ``grad_norm`` (before clipping), ``tokens``,
    ``step``. ``config.mixed_precision`` trains under bf16 autocast (fp16 with loss scaling on a
    GPU without bf16), params staying float32.
    """

    def __init__(self, model: AdvancedTransformerModel, config: Optional[ModelConfig] = None, tokenizer=None,
                 *, num_training_steps: int = 10000, seed: int = 0, precision: Optional[str] = None):
        if not isinstance(model, AdvancedTransformerModel):
            raise TypeError(
                f"AdvancedTrainingPipeline drives an AdvancedTransformerModel, got {type(model).__name__}; "
                "for other modules use AdvancedOptimizers.create_optimizer with an ordinary torch loop"
            )
        self.model = model
        self.config = model.config if config is None else config
        if not isinstance(self.config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        vocab = model.config.vocab_size
        if tokenizer is not None and _tokenizer_size(tokenizer) > vocab:
            # not an error: the guide's own integration test pairs gpt2 with a 100-token model and
            # feeds it ids < 100; ids the model cannot embed are refused when they come
            warnings.warn(
                f"the tokenizer has {_tokenizer_size(tokenizer)} tokens (len(tokenizer)) but the model's "
                f"vocab_size is {vocab}: batches and prompts with token ids >= {vocab} will be refused. "
                "Build the model with ModelConfig(vocab_size=len(tokenizer))", UserWarning, stacklevel=2)
        self.num_training_steps = num_training_steps
        self.seed = int(seed)
        self.precision = precision or self._precision()
        from .train import make_eval_step, make_train_step

        self.optimizer = AdvancedOptimizers.functional(self.config, self._params(), num_training_steps)
        self._step_fn = make_train_step(self._loss, self.optimizer, precision=self.precision)
        self._eval_fn = make_eval_step(self._eval_loss, precision=self.precision)
        self.opt_state = self._step_fn.init(self._params())
        self.step = 0
        self._gen_generator: Optional[torch.Generator] = None

    # the loss is read from the model at call time, so gradient_checkpointing_enable() applies
    def _loss(self, params, batch, generator=None):
        from .train import make_lm_loss

        return make_lm_loss(self.model.spec, train=True)(params, batch, generator)

    def _eval_loss(self, params, batch):
        from .train import make_lm_loss

        return make_lm_loss(self.model.spec, train=False)(params, batch)

    def _precision(self) -> str:
        from .train import resolve_precision

        return resolve_precision("mixed" if self.config.mixed_precision else "fp32", next(self.model.parameters()).device)

    def _params(self):
        return tree.map(lambda t: t.detach(), self.model.params())

    def _batch(self, batch: Mapping[str, Tensor]) -> dict:
        if "input_ids" not in batch:
            raise KeyError("batch needs 'input_ids' (and optionally 'attention_mask', 'labels')")
        out = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels") and v is not None}
        vocab = self.model.config.vocab_size
        _check_ids_fit(out["input_ids"], vocab, self.tokenizer, "input_ids")
        if "labels" in out:
            _check_ids_fit(out["labels"], vocab, self.tokenizer, "labels")
        return out

    def _generator(self) -> Optional[torch.Generator]:
        c = self.model.config
        if c.dropout == 0 and c.attention_dropout == 0:
            return None
        from .train import dropout_generator

        return dropout_generator(self.seed, self.step, next(self.model.parameters()).device)

    def train_step(self, batch: Mapping[str, Tensor]) -> dict:
        batch = self._batch(batch)
        gen = self._generator()
        args = (self._params(), self.opt_state, batch) + ((gen,) if gen is not None else ())
        new_params, self.opt_state, m = self._step_fn(*args)
        with torch.no_grad():
            for name, new in tree.flatten(new_params).items():
                self.model.get_parameter(name).copy_(new)
        self.step += 1
        out = {k: float(v) for k, v in m.items() if k != "tokens"}
        out["tokens"] = int(m["tokens"])
        out["step"] = self.step
        return out

    def evaluate_step(self, batch: Mapping[str, Tensor]) -> dict:
        m = self._eval_fn(self._params(), self._batch(batch))
        return {"loss": float(m["loss"]), "perplexity": float(m["perplexity"]), "tokens": int(m["tokens"])}

    def generate_text(self, prompt: str, max_length: int = 100, temperature: float = 1.0, top_k: int = 50,
                      top_p: float = 1.0, *, do_sample: bool = True, seed: Optional[int] = None) -> str:
        """Prompt + continuation as text; ``max_length`` counts prompt and new tokens (transformers').
        Sampling with temperature, top-k, top-p (``do_sample=False``: greedy) by
        :func:`aam_func.generate.generate`; ``seed`` fixes the draw, else a pipeline generator."""
        from .generate import generate

        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer: AdvancedTrainingPipeline(model, config, tokenizer)")
        ids = self.tokenizer.tokenize_text([prompt], padding=False, truncation=False)["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError("the prompt encodes to no tokens")
        vocab = self.model.config.vocab_size
        _check_ids_fit(ids, vocab, self.tokenizer, "the encoded prompt")
        new = max_length - ids.shape[1]
        if new < 1:
            raise ValueError(f"max_length={max_length} leaves no room after the prompt's {ids.shape[1]} tokens "
                             "(max_length counts the prompt)")
        dev = next(self.model.parameters()).device
        if seed is not None:
            gen = torch.Generator(device=dev).manual_seed(int(seed))
        else:
            if self._gen_generator is None:
                self._gen_generator = torch.Generator(device=dev).manual_seed(self.seed)
            gen = self._gen_generator
        out = generate(self.model.spec, self._params(), ids.to(dev), max_new_tokens=new, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=self.tokenizer.eos_token_id, generator=gen if do_sample else None)
        return self.tokenizer.decode_tokens(out[0])
