"""``aam-func export``: a checkpoint for transformers, PEFT or as one safetensors file
(:func:`aam_func.interop.export.export_checkpoint`)."""

from __future__ import annotations

import argparse

from .args import checkpoint_arg

__all__ = ["add_parser", "cmd_export"]

FORMATS = ("transformers", "peft", "safetensors")  # aam_func.interop.export.FORMATS (not imported at parse time)


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("export", help="write a checkpoint as a transformers model, PEFT adapters or a safetensors file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    checkpoint_arg(e)
    e.add_argument("--format", choices=FORMATS, default="transformers",
                   help="transformers: a from_pretrained directory with the tokenizer; peft: a LoRA run's adapters; "
                        "safetensors: the params under aam_func's names, the config in the metadata")
    e.add_argument("--output", required=True, help="the directory (transformers, peft) or file (safetensors) to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return e


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from ..interop.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, args.format, overwrite=args.overwrite)
    print(f"exported {args.format}: {out}")
    return 0
