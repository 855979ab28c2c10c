"""LoRA fine-tuning step: time and memory against full fine-tuning and against PEFT, one run (CPU).

Run:  python benchmarks/lora.py            (GPT-2 shaped, d=512, 4 layers, batch 8 x 128 tokens)
      python benchmarks/lora.py --quick    (d=256, 2 layers, batch 4 x 64, for a smoke run)

Model: a transformers GPT-2 built from a config (nothing downloaded), and the same weights as an
aam_func Transformer (``interop.hf.from_transformers``). LoRA rank 8, alpha 16, on the attention
projections and MLP (c_attn, c_proj, c_fc; ours: qkv, out, fc, proj). AdamW everywhere.

Variants (one training step = forward + backward + optimizer update):
- ``aam full``       aam_func, every parameter trained (``train.make_train_step``)
- ``aam lora fact``  aam_func, adapters only, factored form x·Wᵀ + s·(x·Aᵀ)·Bᵀ (``spec.loss``)
- ``aam lora merged`` aam_func, adapters only, W + s·B·A formed inside the differentiated function
- ``hf full``        transformers model, eager autograd, ``torch.optim.AdamW`` over all params
- ``hf ours``        transformers model run by ``spec.call`` under ``torch.func.grad`` wrt adapters,
                     ``aam_func.optim.adamw`` on the adapters
- ``hf peft``        PEFT's LoraModel (module surgery), eager autograd, ``torch.optim.AdamW``

Time: in-process, CPU seconds per step (``time.process_time``; the machine is shared so wall time
is unreliable), best of ``--repeats`` after two warm-up steps, one thread, the variants interleaved.
Memory: each variant in a fresh process; ``peak_extra`` = ``ru_maxrss`` after three steps minus the
RSS before the first (activations, gradients, optimizer state, temporaries). Ratios against
``aam full`` (and ``hf full``) from the same run are the claim.
Also: factored vs merged for one linear layer at the model's width (forward + backward wrt A, B).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RANK, ALPHA = 8, 16.0
VARIANTS = ["aam full", "aam lora fact", "aam lora merged", "hf full", "hf ours", "hf peft"]


def sizes(quick: bool) -> dict:
    if quick:
        return dict(d=256, layers=2, heads=4, vocab=4096, batch=4, seq=64)
    return dict(d=512, layers=4, heads=8, vocab=8192, batch=8, seq=128)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(variant: str, s: dict):
    """(step(), n_trainable) for a variant; step() runs one training step."""
    warnings.filterwarnings("ignore")
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import aam_func as af
    from aam_func import optim, tree
    from aam_func.interop import hf
    from aam_func.peft import lora
    from aam_func.train import make_lm_loss, make_train_step

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=s["d"], n_layer=s["layers"], n_head=s["heads"], vocab_size=s["vocab"],
                     n_positions=s["seq"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=None, eos_token_id=None)
    m = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    hf_targets = ["c_attn", "c_proj", "c_fc"]
    if variant.startswith("aam"):
        acfg, params = hf.from_transformers(m)
        model = af.Transformer(acfg)
        del m
        loss_fn = make_lm_loss(model)
        if variant == "aam full":
            step = make_train_step(loss_fn, optim.adamw(1e-4))
            state = {"p": params, "o": step.init(params)}

            def run():
                state["p"], state["o"], _ = step(state["p"], state["o"], batch)

            return run, tree.count(params)
        spec, ad = lora.init(params, targets=["*.attn.qkv", "*.attn.out", "*.mlp.fc", "*.mlp.proj"],
                             rank=RANK, alpha=ALPHA, b_std=0.01)
        mode = "factored" if variant.endswith("fact") else "merged"
        step = make_train_step(spec.loss(loss_fn, params, mode=mode), optim.adamw(1e-4))
        state = {"a": ad, "o": step.init(ad)}

        def run():
            state["a"], state["o"], _ = step(state["a"], state["o"], batch)

        return run, tree.count(ad)
    if variant == "hf full":
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            m(ids, labels=ids).loss.backward()
            opt.step()

        return run, sum(p.numel() for p in m.parameters())
    if variant == "hf ours":
        m.train()
        m.requires_grad_(False)
        spec, ad = lora.init(m, targets=hf_targets, rank=RANK, alpha=ALPHA, b_std=0.01)
        opt = optim.adamw(1e-4)
        state = {"a": ad, "o": opt.init(ad)}
        g = torch.func.grad(lambda a: spec.call(m, a, ids, labels=ids).loss)

        def run():
            grads = g(state["a"])
            upd, state["o"] = opt.update(grads, state["o"], state["a"])
            state["a"] = optim.apply_updates(state["a"], upd)

        return run, tree.count(ad)
    if variant == "hf peft":
        import peft

        pm = peft.get_peft_model(m, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=hf_targets,
                                                    fan_in_fan_out=True, lora_dropout=0.0))
        pm.train()
        trainable = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            pm(ids, labels=ids).loss.backward()
            opt.step()

        return run, sum(p.numel() for p in trainable)
    raise ValueError(variant)


def measure_memory(variant: str, s: dict) -> dict:
    run, n = build(variant, s)
    before = _rss_kib()
    for _ in range(3):
        run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": max(0, peak - before) / 1024, "trainable": n}


def measure_times(variants: list[str], s: dict, repeats: int) -> dict[str, float]:
    """Best CPU seconds per step; repeats interleave the variants round-robin so that a noisy
    neighbour on the shared machine hits all of them alike."""
    runs = {v: build(v, s)[0] for v in variants}
    for run in runs.values():
        run()
        run()
    best = {v: float("inf") for v in variants}
    for _ in range(repeats):
        for v, run in runs.items():
            t0 = time.process_time()
            run()
            best[v] = min(best[v], time.process_time() - t0)
    return best


def linear_micro(d: int, n_tokens: int, repeats: int) -> dict:
    """One d x 4d linear (GPT-2's c_fc), forward + backward wrt A, B: factored vs merged."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, d, generator=g)
    w, b = torch.randn(4 * d, d, generator=g) * 0.02, torch.zeros(4 * d)
    a0, b0 = torch.randn(RANK, d, generator=g) * 0.02, torch.randn(4 * d, RANK, generator=g) * 0.02
    s = ALPHA / RANK

    def fact(a, bb):
        return (F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s).square().mean()

    def merged(a, bb):
        return F.linear(x, w + s * bb @ a, b).square().mean()

    out = {}
    for name, fn in (("factored", fact), ("merged", merged)):
        gf = torch.func.grad(fn, argnums=(0, 1))
        for _ in range(2):
            gf(a0, b0)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            gf(a0, b0)
            best = min(best, time.process_time() - t0)
        out[name] = best
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # CPU seconds on one thread: comparable on a shared machine
    s = sizes(args.quick)
    if args.child:
        print(json.dumps(measure_memory(args.child, s)))
        return
    try:
        import peft  # noqa: F401
        variants = VARIANTS
    except ImportError:
        print("peft is not installed: the 'hf peft' row is skipped (pip install peft)")
        variants = [v for v in VARIANTS if v != "hf peft"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, sizes {s}, rank {RANK}")
    rows = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v] + (["--quick"] if args.quick else [])
        rows[v] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    for v, t in measure_times(variants, s, args.repeats).items():
        rows[v]["step_s"] = t
    print(f"\n{'variant':18s} {'trainable':>11s} {'step CPU s':>11s} {'x anchor':>9s} {'peak extra MiB':>15s} {'x anchor':>9s}")
    for v, r in rows.items():
        anchor = rows["aam full"] if v.startswith("aam") else rows["hf full"]
        print(f"{v:18s} {r['trainable']:11d} {r['step_s']:11.3f} {r['step_s'] / anchor['step_s']:9.2f} "
              f"{r['peak_extra_mib']:15.1f} {r['peak_extra_mib'] / max(anchor['peak_extra_mib'], 1e-9):9.2f}")
    if "hf peft" in rows:
        print(f"\nhf ours / hf peft: step time {rows['hf ours']['step_s'] / rows['hf peft']['step_s']:.2f}x, "
              f"peak extra {rows['hf ours']['peak_extra_mib'] / max(rows['hf peft']['peak_extra_mib'], 1e-9):.2f}x")
    micro = linear_micro(s["d"], s["batch"] * s["seq"], args.repeats)
    print(f"\none linear {s['d']} -> {4 * s['d']}, {s['batch'] * s['seq']} tokens, grad wrt A, B: "
          f"factored {micro['factored'] * 1e3:.1f} ms, merged {micro['merged'] * 1e3:.1f} ms "
          f"(merged / factored {micro['merged'] / micro['factored']:.2f}x)")


if __name__ == "__main__":
    main()
