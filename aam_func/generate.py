"""Text generation: greedy and sampling over a pure KV cache.

    out = generate(model, params, input_ids, attention_mask=mask, max_new_tokens=64,
                   do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=0, eos_token_id=tok.eos_token_id)

The pieces are pure functions over tensors, usable in hand-written loops:

- ``cache = init_cache(model, batch)``: ``{"kv": [(k, v) per layer], "mask": (batch, past) bool,
  "next_pos": (batch,) int64}``: a tensor tree, passed in and returned, never written in place.
- ``logits, cache = forward_cached(model, params, tokens, cache)``: logits of the new tokens
  (batch, new, vocab) and the grown cache (prefill and decode are the same call).
- ``cache = init_static_cache(model, batch, max_len)`` and ``forward_static(...)``: the same
  with preallocated (batch, kv_heads, max_len, head_dim) buffers and a 0-d ``"length"``, so
  every decode step has the same shapes; ``generate``'s default, and what ``compile=True``
  compiles (once per model and shape, no recompiles per token).
  Both run the model's KV-cached path, ``Transformer.decode``, on the cache's tensors.
- ``process_logits(logits, seen, ...)``: repetition penalty, then (sampling) temperature, top-k,
  top-p, in transformers' order, with transformers' tie and threshold rules.

Batched prompts are left-padded (``attention_mask`` 0 on the left); positions count real tokens
only, so a padded prompt generates what the unpadded one would. Rows that emit ``eos`` continue
with ``pad_token_id`` and generation stops when every row has finished (as transformers).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_int, check_number
from .model import key_padding_mask

__all__ = [
    "generate",
    "init_cache",
    "forward_cached",
    "init_static_cache",
    "forward_static",
    "process_logits",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "left_pad",
]


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> left-padded ``(input_ids, attention_mask)``, each (batch, longest)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float, seen_mask: Optional[Tensor] = None) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019), as transformers: for every token already in ``seen``
    (batch, L), a positive logit is divided by ``penalty`` and a negative one multiplied.
    Positions where ``seen_mask`` is 0 (padding) do not count."""
    if penalty == 1.0:
        return logits
    if seen_mask is not None:  # point padded positions at a token that is seen anyway
        seen = torch.where(seen_mask.bool(), seen, seen[:, -1:].expand_as(seen))
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept); others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus filtering, transformers' rule: sort ascending, drop tokens whose cumulative
    probability is <= 1 - p (so the token that crosses the threshold is kept), always keep the
    most likely ``min_tokens_to_keep``."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: Tensor,
    seen: Optional[Tensor] = None,
    *,
    seen_mask: Optional[Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """Next-token logits (batch, vocab) -> processed scores, in transformers' order:
    repetition penalty; then, when sampling, temperature, top-k, top-p."""
    scores = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, repetition_penalty, seen_mask)
    if do_sample:
        if temperature != 1.0:
            scores = scores / temperature
        scores = top_k_filter(scores, top_k)
        scores = top_p_filter(scores, top_p)
    return scores


def _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    check_int("max_new_tokens", max_new_tokens, min=0)
    check_number("temperature", temperature, min=0, min_open=True, finite=False)
    check_int("top_k", top_k, min=0)  # 0: off
    check_number("top_p", top_p, min=0, min_open=True, max=1)
    check_number("repetition_penalty", repetition_penalty, min=0, min_open=True, finite=False)


# ----------------------------------------------------------------------------- the cache


def init_cache(model, batch: int, *, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """An empty cache for ``batch`` rows: zero-length keys/values per layer."""
    c = model.cfg
    empty = torch.zeros((batch, c.n_kv_heads, 0, c.head_dim), dtype=dtype, device=device)
    return {
        "kv": [(empty, empty) for _ in range(c.n_layers)],
        "mask": torch.zeros((batch, 0), dtype=torch.bool, device=device),
        "next_pos": torch.zeros((batch,), dtype=torch.long, device=device),
    }


def forward_cached(model, params, tokens: Tensor, cache: dict, attention_mask: Optional[Tensor] = None,
                   *, padded: Optional[bool] = None):
    """Run ``tokens`` (batch, new) after the cached prefix: ``(logits (batch, new, vocab), cache)``.

    ``attention_mask`` (batch, new) marks real tokens among the new ones (left padding in a
    prompt); positions continue from each row's count of real tokens. ``padded=False`` promises
    that no position so far is padding (then the model runs without a mask, on its fastest
    attention path); ``None`` checks.
    """
    B, T = tokens.shape
    new_mask = key_padding_mask(attention_mask, B, T)  # (B, T) bool; 0/1 checked
    if new_mask is None:
        new_mask = torch.ones((B, T), dtype=torch.bool, device=tokens.device)
    mask = torch.cat([cache["mask"], new_mask], dim=1)
    if padded is None:
        padded = not bool(mask.all())
    if padded:
        positions = cache["next_pos"][:, None] + new_mask.long().cumsum(dim=1) - 1
        out = model.decode(params, tokens, cache["kv"], attention_mask=mask, position_ids=positions.clamp(min=0))
    else:  # positions are past .. past + new - 1 for every row: the model's default
        out = model.decode(params, tokens, cache["kv"])
    new_cache = {"kv": out["past_kv"], "mask": mask, "next_pos": cache["next_pos"] + new_mask.long().sum(dim=1)}
    return out["logits"], new_cache


def init_static_cache(model, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """An empty static cache: per layer (k, v) zero buffers (batch, kv_heads, max_len, head_dim),
    ``"mask"`` (batch, max_len) bool (True: not padding; slots not yet written are never read),
    ``"next_pos"`` (batch,) the next position per row, ``"length"`` 0-d: slots written so far."""
    c = model.cfg
    check_int("max_len", max_len, min=1, max=c.max_seq_len)  # at most the model's max_seq_len
    shape = (batch, c.n_kv_heads, max_len, c.head_dim)
    return {
        "kv": [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
               for _ in range(c.n_layers)],
        "mask": torch.ones((batch, max_len), dtype=torch.bool, device=device),
        "next_pos": torch.zeros((batch,), dtype=torch.long, device=device),
        "length": torch.zeros((), dtype=torch.long, device=device),
    }


def forward_static(model, params, tokens: Tensor, cache: dict, attention_mask: Optional[Tensor] = None, *,
                   padded: Optional[bool] = None, validate: bool = True, write_in_place: bool = False):
    """``forward_cached`` over a static cache: ``(logits (batch, new, vocab), cache)``.

    The new tokens go to slots ``length + [0, new)``. The returned cache holds new buffers and
    the input cache is left as it was, unless ``write_in_place``: then the kv buffers of the
    input cache are written (and returned), for a loop that owns them and drops the old cache
    (``generate`` does; it saves a copy of every buffer per token). ``validate=False`` skips the
    model's per-call checks (see ``Transformer.apply``), the 0/1 check of ``attention_mask`` included.
    """
    B, T = tokens.shape
    length = cache["length"]
    new_mask = key_padding_mask(attention_mask, B, T, validate)  # (B, T) bool or None; 0/1 checked
    if new_mask is None:
        mask = cache["mask"]
    else:
        mask = cache["mask"].index_copy(1, length + torch.arange(T, device=tokens.device), new_mask)
    if padded is None:
        padded = not bool(mask.all())
    kw = dict(cache_position=length, write_in_place=write_in_place, validate=validate)
    if padded:
        counts = torch.ones_like(tokens).cumsum(dim=1) if new_mask is None else new_mask.long().cumsum(dim=1)
        positions = (cache["next_pos"][:, None] + counts - 1).clamp(min=0)
        out = model.decode(params, tokens, cache["kv"], attention_mask=mask, position_ids=positions, **kw)
    else:  # positions are the slot numbers: the model's default
        out = model.decode(params, tokens, cache["kv"], **kw)
    added = T if new_mask is None else new_mask.long().sum(dim=1)
    new_cache = {"kv": out["past_kv"], "mask": mask, "next_pos": cache["next_pos"] + added, "length": length + T}
    return out["logits"], new_cache


COMPILED_STEPS_KEPT = 8  # dynamo's default recompile limit: further entries would not compile anyway


def _decode_step(model, padded: bool):
    """One decode step over a static cache, validation off, buffers written in place (the
    generate loop owns them)."""

    def step(params, token, cache):
        return forward_static(model, params, token, cache, padded=padded, validate=False, write_in_place=True)

    return step


@functools.lru_cache(maxsize=COMPILED_STEPS_KEPT)
def _compiled_step(model, padded: bool):
    """``_decode_step`` under ``torch.compile``, made once per (model, padded) and kept in an LRU
    of ``COMPILED_STEPS_KEPT`` entries: repeated ``generate(compile=True)`` calls reuse it, and a
    process that goes through many models holds a bounded number of them."""
    return torch.compile(_decode_step(model, padded), dynamic=False)


def _prefill(model, params, input_ids: Tensor, mask: Tensor, padded: bool, cache: str, compile: bool, total: int):
    """The prompt (batch, prompt) through a fresh cache sized for ``total`` tokens:
    ``(logits (batch, prompt, vocab), cache, step)`` with ``step(params, token, cache) ->
    (logits, cache)`` the decode step for one more token (batch, 1)."""
    B = input_ids.shape[0]
    dtype, device = params["embed"]["weight"].dtype, input_ids.device
    if cache == "static":
        # buffers rounded up to 64 slots, so that nearby lengths share one compiled step
        max_len = min(model.cfg.max_seq_len, -(-total // 64) * 64)
        kv = init_static_cache(model, B, max_len, dtype=dtype, device=device)
        logits, kv = forward_static(model, params, input_ids, kv, mask, padded=padded)  # validates once
        return logits, kv, _compiled_step(model, padded) if compile else _decode_step(model, padded)
    kv = init_cache(model, B, dtype=dtype, device=device)
    logits, kv = forward_cached(model, params, input_ids, kv, mask, padded=padded)
    return logits, kv, lambda params, token, kv: forward_cached(model, params, token, kv, padded=padded)


def _next_token(logits: Tensor, seen: Tensor, seen_mask: Tensor, generator: Optional[torch.Generator], *,
                do_sample: bool, **processing) -> Tensor:
    """Last-position logits (batch, vocab) -> the next token per row (batch,): processed
    (``process_logits``), then drawn from ``generator`` or, greedy, the argmax."""
    scores = process_logits(logits, seen, seen_mask=seen_mask, do_sample=do_sample, **processing)
    if do_sample:
        probs = F.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


def _forward_full(model, params, ids: Tensor, mask: Tensor) -> Tensor:
    if bool(mask.all()):
        return model.apply(params, ids)["logits"]
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return model.apply(params, ids, attention_mask=mask.bool(), position_ids=positions)["logits"]


# ----------------------------------------------------------------------------- generate


@torch.no_grad()
def generate(
    model,
    params,
    input_ids: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    cache: str = "static",
    compile: bool = False,
) -> Tensor:
    """Prompt ids (batch, prompt) -> (batch, prompt + generated) ids.

    Greedy unless ``do_sample``; sampling draws from ``generator`` (or a fresh one seeded with
    ``seed``; the same seed gives the same text). ``use_cache=False`` recomputes the whole
    sequence each step (the reference the cache must equal). ``cache="static"`` decodes over
    preallocated buffers (validation once, at the prompt); ``"dynamic"`` grows the cache by
    concatenation. ``compile=True`` compiles the static decode step with ``torch.compile``
    (once per model, batch and length; the first call pays the compile time). Compiled steps
    are kept for the last ``COMPILED_STEPS_KEPT`` (model, padding) pairs; they share dynamo's
    recompile limit (8 shapes/models), past which further ones run uncompiled, with its warning.
    ``attention_mask`` (batch, prompt) holds 0/1 or bools (other values are an error).
    """
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
    if compile and (cache != "static" or not use_cache):
        raise ValueError("compile=True needs the static cache (cache='static', use_cache=True)")
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt) with prompt >= 1, got shape {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt of {P} tokens + max_new_tokens={max_new_tokens} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    mask = key_padding_mask(attention_mask, B, P)  # (B, P) bool; 0/1 checked
    if mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every prompt needs at least one real token (attention_mask is all 0 in a row)")
    if do_sample and generator is None:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(0 if seed is None else int(seed))
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0

    ids, full_mask = input_ids, mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    padded = not bool(mask.all())
    if use_cache and max_new_tokens > 0:
        logits, kv, step = _prefill(model, params, input_ids, mask, padded, cache, compile, P + max_new_tokens)
    for i in range(max_new_tokens):
        if not use_cache:
            logits = _forward_full(model, params, ids, full_mask)
        nxt = _next_token(logits[:, -1], ids, full_mask, generator, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            finished = finished | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=torch.bool, device=ids.device)], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
        if use_cache and i + 1 < max_new_tokens:
            logits, kv = step(params, nxt[:, None], kv)
    return ids
