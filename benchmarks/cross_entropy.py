"""Fused LM-head cross-entropy vs F.linear + F.cross_entropy: peak memory and time of forward+backward.

    python benchmarks/cross_entropy.py                 # N=8192, V=50257, d=768, float32
    python benchmarks/cross_entropy.py --n 2048 --v 8192 --chunk 512

Peak memory: each variant runs one step in a fresh subprocess; peak RSS (VmHWM, reset once the
inputs exist) minus the RSS at that point (both sides count only what the loss allocates, including the
returned gradients). Time: one more subprocess alternates the two variants (warm-up, then
``--repeats`` rounds) and keeps each one's best, so load from other processes on a shared
machine hits both alike. Prints ratios fused / unfused measured in the same run.
"""

from __future__ import annotations

import argparse
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
    from aam_func.ops.cross_entropy import linear_cross_entropy

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.n, args.d, generator=g).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(args.v, args.d, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, args.v, (args.n,), generator=g)

    def step(variant):
        hidden.grad = weight.grad = None
        if variant == "fused":
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
        return loss.item()

    if args.mode == "mem":
        _reset_peak()
        base = _rss_now()
        loss = step(args.variant)
        return {"variant": args.variant, "loss": loss, "peak_bytes": _peak() - base}
    best = {"fused": float("inf"), "unfused": float("inf")}
    for _ in range(args.repeats + 1):  # the first round warms up
        for variant in best:
            t0 = time.perf_counter()
            step(variant)
            best[variant] = min(best[variant], time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=50257)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--variant", choices=["fused", "unfused"], default=None)
    p.add_argument("--mode", choices=["mem", "time"], default=None)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    def run(*extra):
        cmd = [sys.executable, __file__, *extra] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "mode") and v is not None
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    u, f = (run("--mode=mem", f"--variant={v}") for v in ("unfused", "fused"))
    times = run("--mode=time")
    u["time_s"], f["time_s"] = times["unfused"], times["fused"]
    print(f"N={args.n} V={args.v} d={args.d} {args.dtype} chunk={args.chunk or 'default'} threads={args.threads}")
    for r in (u, f):
        print(f"  {r['variant']:8s} loss={r['loss']:.6f}  peak={r['peak_bytes'] / 2**20:8.1f} MiB  time={r['time_s']:.3f} s")
    print(f"  memory fused/unfused = {f['peak_bytes'] / u['peak_bytes']:.3f}   time fused/unfused = {f['time_s'] / u['time_s']:.3f}")
    print(f"  |loss difference| = {abs(f['loss'] - u['loss']):.2e}")


if __name__ == "__main__":
    main()
