"""``aam-func eval``: token-weighted loss and perplexity of a checkpoint
(:func:`aam_func.run.evaluate_checkpoint`)."""

from __future__ import annotations

import argparse

from ..run.config import PRECISION_FLAG_CHOICES, default
from .args import checkpoint_arg, positive_int

__all__ = ["add_parser", "cmd_eval"]


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    checkpoint_arg(e)
    e.add_argument("--data", default=None, help="evaluate on all of this file or folder; default: the held-out split of the training corpus")
    e.add_argument("--text-field", default=default("text_field"))
    e.add_argument("--seq-len", type=positive_int, default=None, help="default: the training --seq-len")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--precision", choices=PRECISION_FLAG_CHOICES, default="fp32")
    e.add_argument("--device", default="cpu")
    return e


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from ..run import evaluate_checkpoint, resolve_device

    ev = evaluate_checkpoint(args.checkpoint, data=args.data, text_field=args.text_field, seq_len=args.seq_len,
                             batch_size=args.batch_size, precision=args.precision,
                             device=resolve_device(args.device))
    print(f"data: {ev['data']} ({ev['tokens']:,} predicted tokens, {ev['blocks']} blocks of {ev['seq_len']})")
    print(f"loss {ev['loss']:.4f}")
    print(f"perplexity {ev['perplexity']:.2f}")
    return 0
