"""``aam-func eval``: token-weighted loss and perplexity of a checkpoint."""

from __future__ import annotations

import argparse

from ..run.config import PRECISION_FLAG_CHOICES
from .args import CLIError, checkpoint_arg, positive_int
from .generate import load_for_inference

__all__ = ["add_parser", "cmd_eval"]


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    checkpoint_arg(e)
    e.add_argument("--data", default=None, help="evaluate on all of this file or folder; default: the held-out split of the training corpus")
    e.add_argument("--text-field", default="text")
    e.add_argument("--seq-len", type=positive_int, default=None, help="default: the training --seq-len")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--precision", choices=PRECISION_FLAG_CHOICES, default="fp32")
    e.add_argument("--device", default="cpu")
    return e


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from ..data import eval_batches, load_corpus, load_split, pack, tokenize_documents
    from ..run import resolve_device
    from ..train import evaluate, make_eval_step, make_lm_loss, resolve_precision

    device = resolve_device(args.device)
    ckpt, model, params, tok = load_for_inference(args.checkpoint, device)
    saved = ckpt.train_state.get("args", {})
    seq_len = args.seq_len or saved.get("seq_len") or ckpt.cfg.max_seq_len
    if seq_len > ckpt.cfg.max_seq_len:
        raise CLIError(f"--seq-len {seq_len} is above the model's maximum sequence length {ckpt.cfg.max_seq_len}")
    if args.data is not None:
        docs, what = load_corpus(args.data, text_field=args.text_field), args.data
    else:
        _, docs = load_split(saved.get("data"), saved.get("text_field", "text"), saved.get("val_fraction", 0.1))
        what = "the held-out split of " + (saved.get("data") or "the embedded corpus")
    ids = tokenize_documents(docs, tok)
    blocks = pack(ids, seq_len, what="evaluation data").to(device)
    precision = resolve_precision(args.precision, device)
    ev = evaluate(make_eval_step(make_lm_loss(model, train=False), precision=precision), params,
                  eval_batches(blocks, args.batch_size))
    print(f"data: {what} ({ev['tokens']:,} predicted tokens, {blocks.shape[0]} blocks of {seq_len})")
    print(f"loss {ev['loss']:.4f}")
    print(f"perplexity {ev['perplexity']:.2f}")
    return 0
