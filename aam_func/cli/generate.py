"""``aam-func generate``: continue prompts with a trained checkpoint."""

from __future__ import annotations

import argparse

from .args import CLIError, checkpoint_arg, nonneg_int, number

__all__ = ["add_parser", "cmd_generate"]


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    checkpoint_arg(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
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
    from ..generate import generate, left_pad
    from ..run import load_for_inference, resolve_device

    device = resolve_device(args.device)
    ckpt, model, params, tok = load_for_inference(args.checkpoint, device)
    prompts = [tok.encode(p) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        raise CLIError("a --prompt is empty; give some text to continue")
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > ckpt.cfg.max_seq_len:
        raise CLIError(f"prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                       f"maximum sequence length {ckpt.cfg.max_seq_len}")
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = generate(
        model, params, ids.to(device), attention_mask=mask.to(device), max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        seed=args.seed,
    )
    for i, row in enumerate(out):
        text = tok.decode(row[ids.shape[1] - len(prompts[i]):])
        if len(args.prompt) > 1:
            print(f"--- {i}")
        print(text, flush=True)
    return 0
