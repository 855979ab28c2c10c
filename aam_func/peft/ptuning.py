"""P-tuning (Liu et al. 2021, "GPT Understands, Too") as a pure input transform.

    prompt = ptuning.init(d_model=256, num_virtual_tokens=10, encoder="mlp", seed=0)
    batch = ptuning.apply(prompt, model.embed(params, ids), attention_mask, labels)
    out = model.apply(params, **batch)                 # or hf_model(**batch): inputs_embeds, attention_mask, labels
    g = torch.func.grad(lambda pr: model.apply(params, **ptuning.apply(pr, model.embed(params, ids), labels=ids))["loss"])(prompt)

``n`` trainable virtual tokens are prepended to the token embeddings: the attention mask gains
``n`` ones in front (every real token attends to the virtual ones, which precede it causally)
and the labels gain ``n`` entries of -100 (virtual tokens are never targets). After the model's
shift, the last virtual position predicts the first real token, which plain LM training never
predicts; ``proofs/lora.md`` § P-tuning spells this out. The virtual tokens come from
a reparameterisation of an embedding table, as PEFT's ``PromptEncoder``: ``"mlp"``
(Linear-ReLU-Linear-ReLU-Linear), ``"lstm"`` (2-layer bidirectional LSTM then Linear-ReLU-Linear),
or ``None`` (the table itself, i.e. prompt tuning). Param names equal PEFT's PromptEncoder
``state_dict`` (``embedding.weight``, ``mlp_head.0.weight``, ``lstm_head.weight_ih_l0`` …).

The guide's ``P_TuningLayer`` / ``forward_with_embeddings`` become::

    def p_tuning_forward(params, prompt, input_ids, attention_mask=None, labels=None):
        return model.apply(params, **ptuning.apply(prompt, model.embed(params, input_ids), attention_mask, labels))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import init as initializers
from ..checks import check_choice, check_int
from ..layers.basic import dropout as _dropout
from ..tree import Params

__all__ = ["init", "prompts", "apply", "encoder_kind", "generate", "ENCODERS", "LSTM_LAYERS"]

ENCODERS = ("mlp", "lstm", None)
LSTM_LAYERS = 2  # PEFT's encoder_num_layers default


def _linear(g, fan_in: int, fan_out: int) -> Params:
    return {"weight": initializers.kaiming_uniform((fan_out, fan_in), g, a=math.sqrt(5)),
            "bias": initializers.linear_bias((fan_out,), fan_in, g)}


def init(
    d_model: int,
    num_virtual_tokens: int,
    encoder: Optional[str] = "mlp",
    encoder_hidden_size: Optional[int] = None,
    seed: int = 0,
    *,
    generator: Optional[torch.Generator] = None,
) -> Params:
    """Prompt params: ``embedding.weight`` (n, d) and the encoder's (PEFT's PromptEncoder names).
    ``encoder_hidden_size`` defaults to ``d_model``."""
    check_int("d_model", d_model, min=1)
    check_int("num_virtual_tokens", num_virtual_tokens, min=1)
    check_choice("encoder", encoder, ENCODERS)
    h = d_model if encoder_hidden_size is None else check_int("encoder_hidden_size", encoder_hidden_size, min=1)
    g = initializers.generator(seed if generator is None else generator)
    params: Params = {"embedding": {"weight": initializers.normal((num_virtual_tokens, d_model), g)}}
    if encoder == "mlp":
        params["mlp_head"] = {"0": _linear(g, d_model, h), "2": _linear(g, h, h), "4": _linear(g, h, d_model)}
    elif encoder == "lstm":
        bound = 1.0 / math.sqrt(h)
        lstm = {}
        for layer in range(LSTM_LAYERS):
            fan_in = d_model if layer == 0 else 2 * h
            for sfx in ("", "_reverse"):
                for kind, shape in (("weight_ih", (4 * h, fan_in)), ("weight_hh", (4 * h, h)),
                                    ("bias_ih", (4 * h,)), ("bias_hh", (4 * h,))):
                    lstm[f"{kind}_l{layer}{sfx}"] = initializers.uniform(shape, g, a=-bound, b=bound)
        params["lstm_head"] = lstm
        params["mlp_head"] = {"0": _linear(g, 2 * h, 2 * h), "2": _linear(g, 2 * h, d_model)}
    return params


def encoder_kind(prompt_params: Mapping) -> Optional[str]:
    """"lstm", "mlp" or None, read from the params' structure."""
    if not isinstance(prompt_params, Mapping) or "embedding" not in prompt_params:
        raise ValueError("prompt params must hold 'embedding' (from ptuning.init)")
    if "lstm_head" in prompt_params:
        return "lstm"
    return "mlp" if "mlp_head" in prompt_params else None


def _lstm_direction(x: Tensor, p: Mapping, suffix: str, layer: int, reverse: bool) -> Tensor:
    """One direction of one LSTM layer over (n, in) -> (n, h); gates in torch's order i, f, g, o."""
    w_ih, w_hh = p[f"weight_ih_l{layer}{suffix}"], p[f"weight_hh_l{layer}{suffix}"]
    b = p[f"bias_ih_l{layer}{suffix}"] + p[f"bias_hh_l{layer}{suffix}"]
    hsz = w_hh.shape[1]
    gates_x = F.linear(x, w_ih, b)  # (n, 4h), all input projections at once
    h = x.new_zeros(hsz)
    c = x.new_zeros(hsz)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = [None] * x.shape[0]
    for t in steps:
        i, f, gg, o = (gates_x[t] + w_hh @ h).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs)


def _lstm(x: Tensor, p: Mapping) -> Tensor:
    for layer in range(LSTM_LAYERS):
        x = torch.cat([_lstm_direction(x, p, "", layer, False), _lstm_direction(x, p, "_reverse", layer, True)], -1)
    return x


def _mlp(x: Tensor, p: Mapping) -> Tensor:
    keys = sorted(p, key=int)
    for j, k in enumerate(keys):
        x = F.linear(x, p[k]["weight"], p[k]["bias"])
        if j < len(keys) - 1:
            x = F.relu(x)
    return x


def prompts(prompt_params: Mapping) -> Tensor:
    """The virtual token embeddings (n, d_model), as PEFT's ``PromptEncoder(arange(n))``."""
    kind = encoder_kind(prompt_params)
    x = prompt_params["embedding"]["weight"]
    if kind == "lstm":
        x = _lstm(x, prompt_params["lstm_head"])
    if kind is not None:
        x = _mlp(x, prompt_params["mlp_head"])
    return x


def apply(
    prompt_params: Mapping,
    embeddings: Tensor,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    train: bool = False,
    dropout: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> dict:
    """Prepend the virtual tokens. embeddings (batch, seq, d) -> ``{"inputs_embeds": (batch, n+seq, d),
    "attention_mask": (batch, n+seq) with n leading ones, "labels": (batch, n+seq) with n leading
    -100}``; a missing mask or labels stays ``None`` (no padding: nothing to extend). ``dropout``
    applies to the virtual tokens when ``train`` (the guide's ``P_TuningLayer(dropout=...)``)."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (batch, seq, d_model), got "
                         f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__}")
    virt = prompts(prompt_params)  # (n, d)
    B, T, d = embeddings.shape
    n = virt.shape[0]
    if virt.shape[1] != d:
        raise ValueError(f"prompt params have d_model={virt.shape[1]} but embeddings have {d}")
    virt = _dropout(virt, dropout, train=train, generator=generator)
    out = {"inputs_embeds": torch.cat([virt.to(embeddings.dtype).expand(B, n, d), embeddings], 1),
           "attention_mask": None, "labels": None}
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be (batch, seq) = {(B, T)}, got {tuple(attention_mask.shape)}")
        ones = torch.ones(B, n, dtype=attention_mask.dtype, device=attention_mask.device)
        out["attention_mask"] = torch.cat([ones, attention_mask], 1)
    if labels is not None:
        if tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must be (batch, seq) = {(B, T)}, got {tuple(labels.shape)}")
        ignore = torch.full((B, n), -100, dtype=labels.dtype, device=labels.device)
        out["labels"] = torch.cat([ignore, labels], 1)
    return out


@torch.no_grad()
def generate(model, params: Params, prompt_params: Mapping, input_ids: Tensor, max_new_tokens: int,
             attention_mask: Optional[Tensor] = None) -> Tensor:
    """Greedy continuation of ``input_ids`` (batch, seq) by an aam_func Transformer with the
    virtual tokens in front; returns (batch, seq + max_new_tokens) token ids (virtual tokens are
    not tokens and are not returned). Recomputes the whole prefix each step (n + seq is small)."""
    check_int("max_new_tokens", max_new_tokens, min=0)
    ids = input_ids
    mask = attention_mask
    for _ in range(max_new_tokens):
        batch = apply(prompt_params, model.embed(params, ids), mask)
        logits = model.apply(params, inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"])["logits"]
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt, dtype=mask.dtype)], 1)
    return ids
