"""``aam-func prepare``: a corpus into token shards (:func:`aam_func.data.prepare_corpus`), with a
progress bar and tokens/s; ``aam-func train --data DIR`` then reads them by memory map."""

from __future__ import annotations

import argparse

from ..data import DEFAULT_SHARD_TOKENS
from ..run.config import default
from .args import field_type, positive_int

__all__ = ["add_parser", "cmd_prepare"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="tokenize a corpus once into memory-mapped token shards (docs/data.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="a .txt/.md/.jsonl/.parquet file or a folder of them; default: the embedded corpus")
    p.add_argument("--output", required=True, metavar="DIR", help="the prepared directory (replaced when its inputs differ)")
    p.add_argument("--text-field", default=default("text_field"), help="the text field of .jsonl records / column of .parquet files")
    p.add_argument("--val-fraction", type=field_type("val_fraction"), default=default("val_fraction"), help="held-out share of the documents")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer directory or a cached model name; default: train a byte-level BPE on the training documents")
    p.add_argument("--vocab-size", type=field_type("vocab_size"), default=default("vocab_size"), help="BPE vocabulary size when training a tokenizer")
    p.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    return p


def cmd_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from ..data import prepare_corpus
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer) if args.tokenizer is not None else None
    pd = prepare_corpus(args.data, args.output, tokenizer=tok, vocab_size=args.vocab_size, text_field=args.text_field,
                        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, log=print, progress=True)
    print(f"checksum {pd.checksum}")
    return 0
