"""remat per block vs none: peak memory and time of a Transformer training step under torch.func.grad.

    python benchmarks/remat.py                     # 8 layers, d_model 512, T 512, batch 4, vocab 8192
    python benchmarks/remat.py --layers 2 --seq 128 --batch 2

The step is ``torch.func.grad(loss)(params, batch)``. When the model wires
``cfg.gradient_checkpointing`` (its apply mentions it), the benchmark flips that flag; otherwise
it builds the forward from the model's pieces (embed, positions, blocks, final norm, tied head,
lm_loss) and wraps each block in ``aam_func.ops.remat.remat`` itself. The printed "path" says which.

Peak memory: one step per variant in a fresh subprocess, peak RSS (VmHWM, reset once params and
batch exist) minus the RSS at that point. Time: one more subprocess alternates the variants (warm-up, then ``--repeats``
rounds) and keeps each one's best.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from _memory import peak as _peak, reset_peak as _reset_peak, rss_now as _rss_now  # noqa: E402


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    import aam_func as af
    from aam_func.losses import lm_loss, shift_labels
    from aam_func.ops.remat import remat

    torch.set_num_threads(args.threads)
    cfg = af.ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        max_seq_len=args.seq, dropout=0.0, attention_backend=args.backend,
    )
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    via_config = "gradient_checkpointing" in inspect.getsource(af.Transformer.apply)

    def loss_fn(remat_blocks):
        if via_config:
            m = af.Transformer(cfg.replace(gradient_checkpointing=remat_blocks))
            return lambda p: m.apply(p, ids, labels=ids)["loss"]

        def loss(p):
            x = model.embed(p, ids)
            positions = torch.arange(args.seq)
            if model.positions is not None:
                x = model.positions.apply(p.get("pos", {}), x, positions)
            block = model.block
            apply = lambda bp, x: block.apply(bp, x, positions=positions)  # noqa: E731
            if remat_blocks:
                apply = remat(apply)
            for i in range(cfg.n_layers):
                x = apply(p["blocks"][str(i)], x)
            x = model.final_norm.apply(p["ln_f"], x)
            return lm_loss(F.linear(x, p["embed"]["weight"]), shift_labels(ids))

        return loss

    steps = {v: torch.func.grad(loss_fn(v == "remat")) for v in ("remat", "none")}
    path = "cfg.gradient_checkpointing" if via_config else "hand-built loop over model.block + remat"
    if args.mode == "mem":
        _reset_peak()
        base = _rss_now()
        g = steps[args.variant](params)
        loss = float(loss_fn(args.variant == "remat")(params))
        checksum = float(sum(t.double().abs().sum() for t in af.tree.leaves(g)))
        return {"variant": args.variant, "peak_bytes": _peak() - base, "loss": loss, "grad_l1": checksum, "path": path}
    best = {"remat": float("inf"), "none": float("inf")}
    for _ in range(args.repeats + 1):
        for v in best:
            t0 = time.perf_counter()
            steps[v](params)
            best[v] = min(best[v], time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", dest="d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--variant", choices=["remat", "none"], default=None)
    p.add_argument("--mode", choices=["mem", "time"], default=None)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    def run(*extra):
        cmd = [sys.executable, __file__, *extra] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "mode") and v is not None
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    none, rem = (run("--mode=mem", f"--variant={v}") for v in ("none", "remat"))
    times = run("--mode=time")
    print(
        f"layers={args.layers} d_model={args.d_model} heads={args.heads} T={args.seq} batch={args.batch} "
        f"vocab={args.vocab} backend={args.backend} threads={args.threads}; path: {rem['path']}"
    )
    for r in (none, rem):
        print(f"  {r['variant']:6s} peak={r['peak_bytes'] / 2**20:8.1f} MiB  time={times[r['variant']]:.3f} s  "
              f"loss={r['loss']:.6f}  sum|grad|={r['grad_l1']:.6f}")
    print(f"  memory remat/none = {rem['peak_bytes'] / none['peak_bytes']:.3f}   "
          f"time remat/none = {times['remat'] / times['none']:.3f}")


if __name__ == "__main__":
    main()
