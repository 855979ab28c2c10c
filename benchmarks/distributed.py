"""Data-parallel throughput: ``torchrun --nproc-per-node 2 -m aam_func train`` vs one process.

    python benchmarks/distributed.py                       # the CLI's default model, 60 steps, batch 16 x 128
    python benchmarks/distributed.py --steps 40 --rounds 1 --precision fp32

Runs the real command (same flags, same global batch) as:

- ``1 proc x 2 threads``: one process using both cores (the anchor);
- ``1 proc x 1 thread``: one process on one core;
- ``2 procs x 1 thread``: torchrun, gloo, each rank on one core with half the global batch.

Throughput is the median of the CLI's own ``tokens_per_s`` records (global tokens per second over
10-step windows) after the first ``--skip`` steps; the variants alternate for ``--rounds`` rounds
so machine load hits them alike, and each keeps its best round. Ratios are against the anchor
measured in the same run. The final params of every variant are compared with the anchor's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(variant: str, flags: list[str], out: str, skip: int) -> dict:
    procs, threads = {"1 proc x 2 threads": (1, 2), "1 proc x 1 thread": (1, 1), "2 procs x 1 thread": (2, 1)}[variant]
    if procs == 1:
        cmd = [sys.executable, "-m", "aam_func"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "aam_func"]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, "train", *flags, "--output-dir", out], cwd=ROOT, env=_env(threads),
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    tps = [rec["tokens_per_s"] for rec in records if "tokens_per_s" in rec and rec["step"] > skip]
    final = [rec for rec in records if "val_loss" in rec][-1]
    return {"tokens_per_s": statistics.median(tps), "wall_s": wall, "val_loss": final["val_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="auto")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the throughput (warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    work = tempfile.mkdtemp(prefix="bench_dist_")
    base = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--precision", args.precision, "--eval-every", "0", "--eval-batches", "4", "--sample-tokens", "0",
            "--log-every", "10"]
    prep = subprocess.run([sys.executable, "-m", "aam_func", "train", "--steps", "1", "--sample-tokens", "0",
                           "--eval-batches", "1", "--output-dir", os.path.join(work, "prep")],
                          cwd=ROOT, env=_env(2), capture_output=True, text=True)
    if prep.returncode != 0:
        raise SystemExit(prep.stderr[-3000:])
    flags = [*base, "--tokenizer", os.path.join(work, "prep", "tokenizer")]

    variants = ["1 proc x 2 threads", "1 proc x 1 thread", "2 procs x 1 thread"]
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for v in variants:
            out = os.path.join(work, f"{v.replace(' ', '_')}_{rnd}")
            res = _run(v, flags, out, args.skip)
            res["out"] = out
            if v not in best or res["tokens_per_s"] > best[v]["tokens_per_s"]:
                best[v] = res
            print(f"round {rnd}: {v}: {res['tokens_per_s']:,.0f} tok/s, {res['wall_s']:.1f}s wall", flush=True)

    anchor = best[variants[0]]
    ref = load_file(os.path.join(anchor["out"], "checkpoint", "params.safetensors"))
    print(f"\n{args.steps} steps, global batch {args.batch_size} x {args.seq_len}, precision {args.precision}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| variant | tokens/s (median of 10-step windows) | vs 1 proc x 2 threads | wall (s) | held-out loss | max |param diff| vs anchor |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = best[v]
        got = load_file(os.path.join(r["out"], "checkpoint", "params.safetensors"))
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        print(f"| {v} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x | "
              f"{r['wall_s']:.1f} | {r['val_loss']:.4f} | {diff:.1e} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
