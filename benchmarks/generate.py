"""Greedy decoding speed: aam_func.generate (KV cache) against transformers' generate.

The same GPT-2 (random init, imported with ``from_transformers``), the same prompts, greedy,
exactly ``--new-tokens`` tokens (no eos). Ours runs three ways: ``eager`` (the default
static KV cache), ``compiled`` (``generate(..., compile=True)``; its one-off compile time is
reported apart and not counted) and ``dynamic`` (the concatenating cache). Runs alternate
(eager, compiled, dynamic, transformers, eager, ...) in one process so that load from other
processes hits all alike; the figures are medians, with the load average before and after.
The outputs are checked to be equal token for token.

    python benchmarks/generate.py                       # batch 1 and 8, 128 new tokens
    python benchmarks/generate.py --batches 1,8 --new-tokens 128 --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aam_func as af  # noqa: E402
from aam_func.generate import generate  # noqa: E402
from aam_func.interop.hf import from_transformers  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=args.vocab_size, n_positions=args.prompt_len + args.new_tokens, n_embd=args.d_model,
        n_layer=args.n_layers, n_head=args.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    cfg, params = from_transformers(hf)
    model = af.Transformer(cfg)
    print(f"GPT-2 {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy; {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| batch | aam_func eager tokens/s | compiled | dynamic cache | transformers | eager ratio | compiled ratio "
          "| dynamic ratio | compile time | equal outputs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        x = torch.randint(1, args.vocab_size, (b, args.prompt_len), generator=torch.Generator().manual_seed(b))
        mask = torch.ones_like(x)
        kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens)
        runs = {
            "eager": lambda: generate(model, params, x, **kw),
            "compiled": lambda: generate(model, params, x, compile=True, **kw),
            "dynamic": lambda: generate(model, params, x, cache="dynamic", **kw),
        }

        def theirs():
            with torch.no_grad():
                return hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens)

        runs["transformers"] = theirs
        t = time.perf_counter()
        compiled_out = runs["compiled"]()  # compiles (once per batch shape)
        compile_s = time.perf_counter() - t
        want = theirs()
        equal = all(torch.equal(f(), want) for k, f in runs.items() if k != "compiled")  # also warms up
        equal = equal and torch.equal(compiled_out, want)
        times = {k: [] for k in runs}
        for _ in range(args.reps):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        n = b * args.new_tokens
        tps = {k: n / statistics.median(v) for k, v in times.items()}
        h = tps["transformers"]
        print(f"| {b} | {tps['eager']:,.0f} | {tps['compiled']:,.0f} | {tps['dynamic']:,.0f} | {h:,.0f} "
              f"| {tps['eager'] / h:.2f}x | {tps['compiled'] / h:.2f}x | {tps['dynamic'] / h:.2f}x "
              f"| {compile_s:.1f} s | {equal} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
