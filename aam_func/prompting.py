"""Prompts as text: read from a file, encoded as the model's tokenizer does (its special tokens,
or its chat template), completed in batches. What ``aam-func generate`` runs, as library calls.

    prompts = read_prompts("prompts.jsonl")                 # {"prompt": ...} per line, or one prompt per line
    rows = complete(model, params, tok, prompts, max_new_tokens=64, batch_size=8, do_sample=False)
    rows[0]["completion"], rows[0]["completion_ids"]

Prompts are encoded with the tokenizer's special tokens (a LLaMA tokenizer's bos, none for a
GPT-2 one), as transformers' ``pipeline("text-generation")`` encodes them, so an exported model
continues the same ids. ``chat=True`` wraps each prompt as one user message in the tokenizer's
chat template with the generation prompt (an error when it has none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

__all__ = ["PromptError", "read_prompts", "encode_prompts", "complete", "write_jsonl"]


class PromptError(ValueError):
    """Prompts that cannot be read, encoded or completed as asked."""


def read_prompts(path: str, *, field: str = "prompt") -> list[str]:
    """The prompts of ``path``: for ``.jsonl``, each non-blank line is a JSON object with a string
    ``field`` (or a JSON string); otherwise each non-blank line is one prompt (``\\n`` in a prompt
    needs jsonl)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise PromptError(f"--prompts-file {path}: not UTF-8 text") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"--prompts-file {path}, line {n}: not JSON ({e.msg})") from None
        text = rec.get(field) if isinstance(rec, dict) else rec
        if not isinstance(text, str):
            raise PromptError(f"--prompts-file {path}, line {n}: expected a JSON object with a string {field!r} "
                              "field, or a JSON string")
        prompts.append(text)
    if not prompts:
        raise PromptError(f"--prompts-file {path} holds no prompt")
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens, or (``chat``) as one user
    message in its chat template followed by the assistant's generation prompt."""
    hf = tokenizer.hf
    if chat and not getattr(hf, "chat_template", None):
        raise PromptError("--chat needs a tokenizer with a chat template, and this one has none "
                          "(chat_template in tokenizer_config.json)")
    out = []
    for i, p in enumerate(prompts):
        if chat:
            text = hf.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = hf(text, add_special_tokens=False)["input_ids"]
        else:
            ids = hf(p, add_special_tokens=True)["input_ids"]
        if not ids:
            raise PromptError(f"prompt {i} is empty; give some text to continue")
        out.append(list(ids))
    return out


def complete(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
             chat: bool = False, device=None, **options) -> list[dict]:
    """Continue ``prompts`` in batches of ``batch_size`` (left-padded; a padded prompt continues as
    it would alone) with :func:`aam_func.generate.generate` (``options``: its sampling arguments).
    One dict per prompt: ``prompt``, ``completion`` (the new text, special tokens dropped),
    ``prompt_ids`` and ``completion_ids`` (up to and including the first eos)."""
    from .generate import generate, left_pad

    encoded = encode_prompts(tokenizer, prompts, chat=chat)
    longest = max(len(p) for p in encoded)
    limit = model.cfg.max_seq_len
    if longest + max_new_tokens > limit:
        raise PromptError(f"prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                          f"maximum sequence length {limit}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = left_pad(chunk, pad)
        out = generate(model, params, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=eos, pad_token_id=pad, **options)
        for j, row in enumerate(out[:, ids.shape[1]:].tolist()):
            new = _until_eos(row, eos)
            rows.append({"prompt": prompts[start + j], "completion": tokenizer.decode(new),
                         "prompt_ids": chunk[j], "completion_ids": new})
    return rows


def _until_eos(ids: list[int], eos: Optional[int]) -> list[int]:
    if eos is not None and eos in ids:
        return ids[:ids.index(eos) + 1]
    return ids


def write_jsonl(rows: Sequence[dict], path: Optional[str]) -> None:
    """``rows`` as JSON lines into ``path`` (written to a temporary name, then renamed), or to
    stdout when ``path`` is None."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None:
        print(lines, end="", flush=True)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(lines)
    os.replace(tmp, path)
