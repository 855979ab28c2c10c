"""aam_func's train step against transformers' GPT2LMHeadModel + torch.optim.AdamW.

Same model (GPT-2 shape: learnable positions, gelu_tanh = HF's gelu_new, tied head, layernorm),
same initial weights (imported from the HF model with ``from_transformers``), same batches from
the embedded corpus (byte-level BPE trained on it), same AdamW (lr, betas, wd on every tensor),
same number of steps. All runs step in lockstep, one step each in turn, so that load from other
processes on a shared machine hits them alike; step times are medians after warmup.

    python benchmarks/train_vs_transformers.py                      # fp32 and bf16, eager
    python benchmarks/train_vs_transformers.py --compile            # plus aam_func compiled
    python benchmarks/train_vs_transformers.py --steps 200 --d-model 256 --n-layers 4

Reports: step time (and ratio to transformers in the same precision), held-out loss after the
run, model FLOPs utilisation against the matmul rate measured here in the same process.
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
from aam_func import optim  # noqa: E402
from aam_func.data import eval_batches, load_split, pack, tokenize_documents  # noqa: E402
from aam_func.interop.hf import from_transformers  # noqa: E402
from aam_func.tokenizer import Tokenizer  # noqa: E402
from aam_func.train import evaluate, make_lm_loss, make_eval_step, make_train_step  # noqa: E402


def model_flops(cfg, tokens: int, seq: int) -> float:
    """Training FLOPs of one step: 6 * tokens * (matmul params incl. the LM head) + attention
    scores and values (6 * 2 * layers * seq * d per token, the PaLM appendix count)."""
    d, L, V, ff = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff
    per_layer = d * 3 * d + d * d + 2 * d * ff
    matmul_params = L * per_layer + V * d
    return 6 * tokens * matmul_params + 12 * L * seq * d * tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from timing")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="also time aam_func with compile=True")
    ap.add_argument("--backends", default="auto,math", help="aam_func attention backends to time (ModelConfig.attention_backend)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    train_docs, val_docs = load_split(None, val_fraction=0.1)  # aam-func train's corpus and split
    tok = Tokenizer.train_bpe(train_docs, args.vocab_size)
    train_blocks = pack(tokenize_documents(train_docs, tok), args.seq_len)
    val_blocks = pack(tokenize_documents(val_docs, tok), args.seq_len)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(train_blocks.shape[0], generator=g) for _ in range(
        1 + args.steps * args.batch_size // train_blocks.shape[0])])

    def batch(i):
        x = train_blocks[order[i * args.batch_size:(i + 1) * args.batch_size]]
        return {"input_ids": x, "labels": x}

    hc = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.n_layers,
        n_head=args.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    hf_init = transformers.GPT2LMHeadModel(hc)
    cfg, params0 = from_transformers(hf_init)
    cfg = cfg.replace(dropout=0.0, attention_dropout=0.0)
    model = af.Transformer(cfg)
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
          f"activation {cfg.activation}, positions {cfg.position_encoding}; batch {args.batch_size}x{args.seq_len}; "
          f"{args.steps} steps; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")

    runs = {}  # name -> dict(step=callable, eval=callable, times=list)
    for prec in args.precisions.split(","):
        # ours
        variants = [(be, False) for be in args.backends.split(",")]
        if args.compile:
            variants.append((args.backends.split(",")[-1], True))
        for backend, compiled in variants:
            model = af.Transformer(cfg.replace(attention_backend=backend))
            opt = optim.adamw(args.lr, weight_decay=0.1)
            step = make_train_step(make_lm_loss(model), opt, precision=prec, compile=compiled)
            state = {"p": {k: v for k, v in params0.items()}, "s": step.init(params0)}

            def ours_step(i, step=step, state=state):
                state["p"], state["s"], m = step(state["p"], state["s"], batch(i))
                return float(m["loss"])

            ev = make_eval_step(make_lm_loss(model, train=False), precision=prec)
            runs[f"aam_func {prec} {backend}{' compiled' if compiled else ''}"] = dict(
                step=ours_step, eval=lambda ev=ev, state=state: evaluate(ev, state["p"], eval_batches(val_blocks, 16))["loss"],
                prec=prec, times=[], losses=[])
        # transformers
        hf = transformers.GPT2LMHeadModel(hc)
        hf.load_state_dict(hf_init.state_dict())
        hf.train()
        hopt = torch.optim.AdamW(hf.parameters(), lr=args.lr, weight_decay=0.1)
        ac = prec != "fp32"

        def hf_step(i, hf=hf, hopt=hopt, ac=ac, prec=prec):
            b = batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16 if prec == "bf16" else torch.float16, enabled=ac):
                loss = hf(input_ids=b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            hopt.step()
            hopt.zero_grad(set_to_none=True)
            return float(loss.detach())

        def hf_eval(hf=hf, ac=ac, prec=prec):
            hf.eval()
            tot, n = 0.0, 0
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16 if prec == "bf16" else torch.float16, enabled=ac):
                for b in eval_batches(val_blocks, 16):
                    k = b["input_ids"].numel() - b["input_ids"].shape[0]
                    tot += float(hf(input_ids=b["input_ids"], labels=b["labels"]).loss) * k
                    n += k
            hf.train()
            return tot / n

        runs[f"transformers {prec}"] = dict(step=hf_step, eval=hf_eval, prec=prec, times=[], losses=[])

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    mm = {p: (torch.randn(1024, 1024).to(dtypes[p]), torch.randn(1024, 1024).to(dtypes[p]), [])
          for p in args.precisions.split(",")}
    for i in range(args.steps):
        for p, (a, b, ts) in mm.items():  # the matmul rate, sampled in the same rounds as the steps
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        for name, r in runs.items():
            t = time.perf_counter()
            r["losses"].append(r["step"](i))
            r["times"].append(time.perf_counter() - t)
        if (i + 1) % max(1, args.steps // 10) == 0:
            print(f"step {i + 1}: " + ", ".join(f"{n} {statistics.median(r['times'][args.warmup:] or r['times']):.3f}s"
                                               for n, r in runs.items()), flush=True)

    rates = {p: 2 * 1024**3 / statistics.median(ts[args.warmup:] or ts) for p, (_, _, ts) in mm.items()}
    flops = model_flops(cfg, args.batch_size * args.seq_len, args.seq_len)
    print(f"\nmatmul rate measured between the steps (1024^3, median): "
          f"{', '.join(f'{p} {r / 1e9:.0f}' for p, r in rates.items())} GFLOP/s; model FLOPs per step {flops / 1e9:.2f} G")
    print("| run | step time (median) | vs transformers, same precision | held-out loss | MFU |")
    print("|---|---|---|---|---|")
    med = {n: statistics.median(r["times"][args.warmup:]) for n, r in runs.items()}
    for name, r in runs.items():
        anchor = med[f"transformers {r['prec']}"]
        loss = r["eval"]()
        mfu = flops / med[name] / rates[r["prec"]]
        print(f"| {name} | {med[name] * 1000:.0f} ms | {med[name] / anchor:.2f}x | {loss:.4f} | {mfu:.0%} |", flush=True)
    best = {p: min((n for n in med if n.startswith(f"aam_func {p} ") and "compiled" not in n), key=med.get, default=None)
            for p in ("fp32", "bf16")}
    if best["fp32"] and best["bf16"]:
        print(f"\nbf16 speed-up over fp32 (fastest eager of each): {best['fp32']} / {best['bf16']} = "
              f"{med[best['fp32']] / med[best['bf16']]:.2f}x")
        lf, lb = runs[best["fp32"]]["losses"], runs[best["bf16"]]["losses"]
        k = max(1, len(lf) // 10)
        print("train loss, mean of each tenth (fp32 | bf16): " + "  ".join(
            f"{statistics.mean(lf[j:j + k]):.3f}|{statistics.mean(lb[j:j + k]):.3f}" for j in range(0, len(lf), k)))


if __name__ == "__main__":
    main()
