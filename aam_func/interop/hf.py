"""Weights in and out of transformers: ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` (and
``MistralForCausalLM``, read as the LLaMA it equals when its sliding window covers the whole context).

    cfg, params = from_transformers(hf_model)     # any loaded model, e.g. from_pretrained(dir)
    hf_model = to_transformers(cfg, params)       # a fresh transformers model holding params

Name maps (ours <- theirs):
- GPT-2: embed <- transformer.wte, pos <- transformer.wpe, blocks.i.ln1/ln2 <- h.i.ln_1/ln_2,
  attn.qkv <- attn.c_attn, attn.out <- attn.c_proj, mlp.fc/proj <- mlp.c_fc/c_proj, ln_f <- ln_f.
  GPT-2's Conv1D stores weights as (in, out): they are transposed to our (out, in).
- LLaMA: embed <- model.embed_tokens, blocks.i.ln1/ln2 <- input_layernorm/post_attention_layernorm,
  attn.qkv <- cat(q_proj, k_proj, v_proj) (rows), attn.out <- o_proj, mlp.gate/up/down <-
  gate_proj/up_proj/down_proj, ln_f <- model.norm, lm_head <- lm_head (when untied).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..layers.attention import qkv_sizes
from ..model import Transformer
from ..tree import Params, flatten, unflatten

__all__ = ["from_transformers", "to_transformers", "config_from_transformers", "config_to_transformers", "gpt2_map",
           "llama_map"]


# transformers model_type -> the family it is read as (its weights use that family's names)
SUPPORTED = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
SUPPORTED_NAMES = ("GPT-2 (model_type 'gpt2'), LLaMA ('llama'), Mistral ('mistral') and Qwen2 ('qwen2'), "
                   "the last two without an effective sliding window")


def _arch(model_or_config: Any) -> str:
    """The family ("gpt2" or "llama") of a transformers model or config; a ValueError listing the
    supported architectures for any other."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    if mt in SUPPORTED:
        return SUPPORTED[mt]
    raise ValueError(f"unsupported architecture model_type={mt!r}: only GPT-2 and LLaMA-family models are "
                     f"supported: {SUPPORTED_NAMES}")


def _check_sliding_window(c: Any) -> None:
    """Mistral's sliding window is exact as full attention only when it covers every position."""
    window = getattr(c, "sliding_window", None)
    mt = getattr(c, "model_type", None)
    if mt == "qwen2":  # Qwen2 slides only in the layers layer_types marks (use_sliding_window)
        sliding = "sliding_attention" in (getattr(c, "layer_types", None) or ())
        window = window if sliding or getattr(c, "use_sliding_window", False) else None
    if mt in ("mistral", "qwen2") and window is not None and window < c.max_position_embeddings:
        name = {"mistral": "Mistral", "qwen2": "Qwen2"}[mt]
        raise ValueError(f"{name} sliding_window={window} < max_position_embeddings={c.max_position_embeddings} "
                         "is not supported (sliding-window attention is not mapped; a window of at least "
                         "max_position_embeddings, or None, is)")


def config_from_transformers(hf_config: Any, **overrides) -> ModelConfig:
    """Our ModelConfig equivalent of a transformers GPT2Config or LlamaConfig."""
    arch = _arch(hf_config)
    c = hf_config
    if arch == "gpt2":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}
        if c.activation_function not in act:
            raise ValueError(f"GPT-2 activation_function {c.activation_function!r} is not supported")
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "add_cross_attention", False):
            raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx or cross-attention are not supported")
        if not getattr(c, "scale_attn_weights", True):
            raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported")
        kw = dict(
            vocab_size=c.vocab_size,
            d_model=c.n_embd,
            n_layers=c.n_layer,
            n_heads=c.n_head,
            d_ff=c.n_inner or 4 * c.n_embd,
            max_seq_len=c.n_positions,
            dropout=0.0,
            activation=act[c.activation_function],
            position_encoding="learnable",
            norm="layernorm",
            norm_eps=c.layer_norm_epsilon,
            bias=True,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            init_std=getattr(c, "initializer_range", 0.02),
        )
    else:
        _check_sliding_window(c)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head_dim * c.num_attention_heads != c.hidden_size:
            raise ValueError(
                f"LLaMA configs with head_dim * num_attention_heads != hidden_size are not supported "
                f"(head_dim={head_dim}, heads={c.num_attention_heads}, hidden_size={c.hidden_size})"
            )
        qwen2 = c.model_type == "qwen2"  # q/k/v biases, none on o_proj and the MLP
        if not qwen2 and bool(getattr(c, "attention_bias", False)) != bool(getattr(c, "mlp_bias", False)):
            raise ValueError("LLaMA configs with attention_bias != mlp_bias are not supported")
        if c.hidden_act != "silu":
            raise ValueError(f"LLaMA hidden_act {c.hidden_act!r} is not supported (silu only)")
        rope = getattr(c, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        scaling = getattr(c, "rope_scaling", None)
        if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
            raise ValueError(f"LLaMA rope_type {rope_type!r} is not supported (default only)")
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        kw = dict(
            vocab_size=c.vocab_size,
            d_model=c.hidden_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            d_ff=c.intermediate_size,
            max_seq_len=c.max_position_embeddings,
            dropout=0.0,
            activation="swiglu",
            position_encoding="rope",
            rope_base=float(theta),
            rope_layout="half",
            norm="rmsnorm",
            norm_eps=c.rms_norm_eps,
            bias=False if qwen2 else bool(getattr(c, "attention_bias", False)),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            init_std=getattr(c, "initializer_range", 0.02),
        )
        if qwen2:
            kw["qkv_bias"] = True
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_transformers(cfg: ModelConfig):
    """A transformers config for ``cfg``: LLaMA-shaped (rope + rmsnorm + swiglu) or GPT-2-shaped
    (learnable positions + layernorm + gelu_tanh/gelu/relu + biases)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if cfg.attention_type != "standard":
        raise ValueError(f"transformers export needs attention_type='standard', got {cfg.attention_type!r}")
    if _qkv_bias(cfg) != cfg.bias and (cfg.bias or cfg.position_encoding != "rope"):
        raise ValueError(f"qkv_bias={cfg.qkv_bias} with bias={cfg.bias} has no transformers equivalent (Qwen2: "
                         "qkv_bias=True, bias=False, LLaMA-shaped)")
    if cfg.position_encoding == "learnable" and cfg.norm == "layernorm" and cfg.bias and cfg.activation != "swiglu":
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("GPT-2 export does not support grouped-query attention (n_kv_heads != n_heads)")
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, activation_function=act,
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=cfg.init_std,
            bos_token_id=None, eos_token_id=None,
        )
    rope_llama = cfg.position_encoding == "rope" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu"
    if rope_llama and cfg.rope_layout == "half" and _qkv_bias(cfg) and not cfg.bias:
        return Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
            tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    if rope_llama and cfg.rope_layout == "half":
        return LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
            initializer_range=cfg.init_std, head_dim=cfg.head_dim,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    raise ValueError(
        "this config has no transformers equivalent: GPT-2 needs position_encoding='learnable', norm='layernorm', "
        "bias=True and a non-gated MLP; LLaMA needs position_encoding='rope', norm='rmsnorm', activation='swiglu', "
        f"rope_layout='half' (got position_encoding={cfg.position_encoding!r}, norm={cfg.norm!r}, "
        f"activation={cfg.activation!r}, bias={cfg.bias})"
    )


def _qkv_bias(cfg: ModelConfig) -> bool:
    """Whether the fused qkv projection has a bias (``qkv_bias``, by default ``bias``)."""
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


def gpt2_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, their name, transpose) for GPT-2."""
    m = [("embed.weight", "transformer.wte.weight", False), ("pos.weight", "transformer.wpe.weight", False)]
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}.", f"transformer.h.{i}."
        m += [
            (o + "ln1.weight", t + "ln_1.weight", False), (o + "ln1.bias", t + "ln_1.bias", False),
            (o + "attn.qkv.weight", t + "attn.c_attn.weight", True), (o + "attn.qkv.bias", t + "attn.c_attn.bias", False),
            (o + "attn.out.weight", t + "attn.c_proj.weight", True), (o + "attn.out.bias", t + "attn.c_proj.bias", False),
            (o + "ln2.weight", t + "ln_2.weight", False), (o + "ln2.bias", t + "ln_2.bias", False),
            (o + "mlp.fc.weight", t + "mlp.c_fc.weight", True), (o + "mlp.fc.bias", t + "mlp.c_fc.bias", False),
            (o + "mlp.proj.weight", t + "mlp.c_proj.weight", True), (o + "mlp.proj.bias", t + "mlp.c_proj.bias", False),
        ]
    m += [("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False)]
    if not cfg.tie_embeddings:
        m.append(("lm_head.weight", "lm_head.weight", False))
    return m


def llama_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, their name) for LLaMA, except the fused qkv handled separately."""
    m = [("embed.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}.", f"model.layers.{i}."
        m += [
            (o + "ln1.weight", t + "input_layernorm.weight"),
            (o + "ln2.weight", t + "post_attention_layernorm.weight"),
            (o + "attn.out.weight", t + "self_attn.o_proj.weight"),
            (o + "mlp.gate.weight", t + "mlp.gate_proj.weight"),
            (o + "mlp.up.weight", t + "mlp.up_proj.weight"),
            (o + "mlp.down.weight", t + "mlp.down_proj.weight"),
        ]
        if cfg.bias:
            m += [
                (o + "attn.out.bias", t + "self_attn.o_proj.bias"),
                (o + "mlp.gate.bias", t + "mlp.gate_proj.bias"),
                (o + "mlp.up.bias", t + "mlp.up_proj.bias"),
                (o + "mlp.down.bias", t + "mlp.down_proj.bias"),
            ]
    m.append(("ln_f.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        m.append(("lm_head.weight", "lm_head.weight"))
    return m


def _hf_state(model: Any) -> dict[str, Tensor]:
    sd = dict(model.state_dict())
    return {k: v.detach() for k, v in sd.items()}


def from_transformers(model: Any, *, dtype: torch.dtype | None = None, **config_overrides) -> tuple[ModelConfig, Params]:
    """(ModelConfig, Params) holding a transformers GPT-2 or LLaMA model's weights (copies)."""
    arch = _arch(model)
    cfg = config_from_transformers(model.config, **config_overrides)
    sd = _hf_state(model)
    flat: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in sd:
            raise ValueError(f"transformers state_dict has no {name!r}; is this a {arch} model?")
        return sd[name]

    if arch == "gpt2":
        for ours, theirs, transpose in gpt2_map(cfg):
            t = take(theirs)
            flat[ours] = (t.t() if transpose else t).clone().contiguous()
    else:
        for ours, theirs in llama_map(cfg):
            flat[ours] = take(theirs).clone()
        for i in range(cfg.n_layers):
            t = f"model.layers.{i}.self_attn."
            flat[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
                [take(t + "q_proj.weight"), take(t + "k_proj.weight"), take(t + "v_proj.weight")], 0
            )
            if _qkv_bias(cfg):
                flat[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                    [take(t + "q_proj.bias"), take(t + "k_proj.bias"), take(t + "v_proj.bias")], 0
                )
    params = unflatten(flat)
    Transformer(cfg).check_params(params)
    if dtype is not None:
        from ..tree import cast

        params = cast(params, dtype)
    return cfg, params


def to_transformers(cfg: ModelConfig, params: Params, *, model: Any = None):
    """A transformers model (GPT2LMHeadModel or LlamaForCausalLM) holding ``params``.

    With ``model`` given, its weights are overwritten in place (shapes must match); otherwise a
    new model is built from :func:`config_to_transformers`.
    """
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

    Transformer(cfg).check_params(params)
    hf_cfg = config_to_transformers(cfg)
    if model is None:
        cls = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[hf_cfg.model_type]
        model = cls(hf_cfg)
    flat = flatten(params)
    sd: dict[str, Tensor] = {}
    if hf_cfg.model_type == "gpt2":
        for ours, theirs, transpose in gpt2_map(cfg):
            t = flat[ours].detach()
            sd[theirs] = (t.t() if transpose else t).contiguous()
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = flat["embed.weight"].detach()
    else:
        for ours, theirs in llama_map(cfg):
            sd[theirs] = flat[ours].detach()
        sizes = qkv_sizes(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        for i in range(cfg.n_layers):
            t = f"model.layers.{i}.self_attn."
            q, k, v = flat[f"blocks.{i}.attn.qkv.weight"].detach().split(sizes, 0)
            sd[t + "q_proj.weight"], sd[t + "k_proj.weight"], sd[t + "v_proj.weight"] = q, k, v
            if _qkv_bias(cfg):
                qb, kb, vb = flat[f"blocks.{i}.attn.qkv.bias"].detach().split(sizes, 0)
                sd[t + "q_proj.bias"], sd[t + "k_proj.bias"], sd[t + "v_proj.bias"] = qb, kb, vb
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = flat["embed.weight"].detach()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"cannot fill transformers weights: {', '.join(missing)}")
    with torch.no_grad():
        for k, v in expected.items():
            if v.shape != sd[k].shape:
                raise ValueError(f"{k}: expected shape {tuple(v.shape)}, got {tuple(sd[k].shape)}")
            v.copy_(sd[k].to(v.dtype))
    return model
