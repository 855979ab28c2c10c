"""``aam-func generate``: continue prompts with a trained checkpoint; prompts from the command line
or a file (:func:`aam_func.prompting.read_prompts`), optionally in the tokenizer's chat template,
in batches, the results as JSON lines (:func:`aam_func.prompting.complete`)."""

from __future__ import annotations

import argparse

from .args import CLIError, checkpoint_arg, nonneg_int, number, positive_int

__all__ = ["add_parser", "cmd_generate"]


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    checkpoint_arg(g)
    g.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    g.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="prompts, one per line, or .jsonl with a \"prompt\" field per line; the results are JSON lines")
    g.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="write the results as JSON lines (prompt, completion, prompt_ids, completion_ids) here; "
                        "default: text on stdout for --prompt, JSON lines on stdout for --prompts-file")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the tokenizer's chat template")
    g.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together (left-padded)")
    g.add_argument("--max-new-tokens", type=nonneg_int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    g.add_argument("--temperature", type=number(0.0, lo_open=True, finite=False), default=0.8)
    g.add_argument("--top-k", type=nonneg_int, default=50, help="0: off")
    g.add_argument("--top-p", type=number(0.0, 1.0, lo_open=True), default=0.95, help="1: off")
    g.add_argument("--repetition-penalty", type=number(0.0, lo_open=True, finite=False), default=1.0)
    g.add_argument("--device", default="cpu")
    return g


def cmd_generate(args: argparse.Namespace, argv: list[str]) -> int:
    from ..prompting import PromptError, complete, read_prompts, write_jsonl
    from ..run import load_for_inference, resolve_device

    if (args.prompt is None) == (args.prompts_file is None):
        raise CLIError("give the prompts with --prompt (repeatable) or --prompts-file, not both and not neither")
    try:
        prompts = args.prompt if args.prompt is not None else read_prompts(args.prompts_file)
    except OSError as e:
        raise CLIError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from None
    except PromptError as e:
        raise CLIError(str(e)) from None
    device = resolve_device(args.device)
    ckpt, model, params, tok = load_for_inference(args.checkpoint, device)
    try:
        rows = complete(model, params, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        chat=args.chat, device=device, do_sample=not args.greedy, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    except PromptError as e:
        raise CLIError(str(e)) from None
    if args.output is not None or args.prompts_file is not None:
        write_jsonl(rows, args.output)
        if args.output is not None:
            print(f"{len(rows)} completions: {args.output}")
        return 0
    for i, r in enumerate(rows):  # the prompt and its continuation, as text
        if len(rows) > 1:
            print(f"--- {i}")
        print(tok.decode(r["prompt_ids"] + r["completion_ids"]), flush=True)
    return 0
