"""A trained checkpoint for inference, and its held-out loss: what ``aam-func generate`` and
``aam-func eval`` load and compute, as library calls.

    ckpt, model, params, tok = load_for_inference("runs/default", "cpu")
    ev = evaluate_checkpoint("runs/default")              # the held-out split of its training corpus
    ev["loss"], ev["perplexity"], ev["tokens"], ev["data"]

The loss is the token-weighted mean of the per-block losses (:func:`aam_func.train.evaluate`),
the perplexity ``exp(loss)``.
"""

from __future__ import annotations

import os
from typing import Optional

from .. import tree
from ..checkpoint import load_checkpoint
from ..data import DEFAULT_EVAL_BATCHES, ShardBlocks, eval_batches, load_corpus, pack, tokenize_documents
from ..model import Transformer
from ..train import evaluate, make_eval_step, make_lm_loss, resolve_precision
from .config import RunError, default
from .preparation import run_data

__all__ = ["load_for_inference", "evaluate_checkpoint"]


def load_for_inference(path: str, device):
    """``(checkpoint, model, params on device, tokenizer)`` of the checkpoint (or run directory)
    ``path``, without optimizer state; a CheckpointError when it holds no tokenizer."""
    ckpt = load_checkpoint(path, load_optimizer=False)
    tok = ckpt.load_tokenizer()
    return ckpt, Transformer(ckpt.cfg), tree.to(ckpt.params, device), tok


def evaluate_checkpoint(path: str, *, data: Optional[str] = None, text_field: str = default("text_field"),
                        seq_len: Optional[int] = None, batch_size: int = 16, precision: str = "fp32",
                        device="cpu") -> dict:
    """Loss and perplexity of the checkpoint at ``path`` on all of ``data`` (a file or folder, its
    ``text_field`` for JSON lines, tokenized in memory), by default on the held-out split of its
    run's prepared data (:func:`aam_func.run.preparation.run_data`; its checksum must be the one the
    checkpoint recorded): the fixed set of blocks the run's evaluations read. Blocks of ``seq_len``
    tokens (default: the training length, else the model's maximum). Returns ``loss``,
    ``perplexity``, ``tokens`` (predicted), ``blocks``, ``seq_len`` and ``data`` (what was read)."""
    ckpt, model, params, tok = load_for_inference(path, device)
    saved = ckpt.train_state.get("args", {})
    seq_len = seq_len or saved.get("seq_len") or ckpt.cfg.max_seq_len
    if seq_len > ckpt.cfg.max_seq_len:
        raise RunError(f"--seq-len {seq_len} is above the model's maximum sequence length {ckpt.cfg.max_seq_len}")
    if data is not None:
        docs, what = load_corpus(data, text_field=text_field), data
        blocks = pack(tokenize_documents(docs, tok), seq_len, what="evaluation data").to(device)
    else:  # the run's prepared data (prepared again if it is gone), checked against the recorded checksum
        _, pd = run_data(saved.get("data"), saved.get("prepared"), os.path.dirname(os.path.abspath(ckpt.path)), tok,
                         vocab_size=ckpt.cfg.vocab_size, text_field=saved.get("text_field", default("text_field")),
                         val_fraction=saved.get("val_fraction", default("val_fraction")),
                         expected=saved.get("data_checksum"))
        rows = (saved.get("eval_batches") or DEFAULT_EVAL_BATCHES) * saved.get("batch_size", default("batch_size"))
        blocks = ShardBlocks(pd.val, seq_len, device=device, what="held-out split").spread(rows)  # the run's set
        what = "the held-out split of " + (saved.get("data") or "the embedded corpus")
    step = make_eval_step(make_lm_loss(model, train=False), precision=resolve_precision(precision, device))
    ev = evaluate(step, params, eval_batches(blocks, batch_size))
    return {**ev, "blocks": blocks.shape[0], "seq_len": seq_len, "data": what}
