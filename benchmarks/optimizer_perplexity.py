"""Held-out perplexity of the default ``aam-func train`` run per optimizer, one run after the
other (each in its own output directory), with the settings docs/cli.md documents: AdamW
(the default), Muon (``--muon-lr 0.02`` on the hidden matrices, AdamW at ``--lr`` on the rest),
schedule-free AdamW (``--lr``, constant after the warmup), Adafactor at torch's default rate
1e-2, Lion at 3e-4 (the usual 3-10x below AdamW's) and AdamW evaluated on an EMA of the params
(``--ema 0.99``). Prints a table of the final held-out loss and perplexity, the step-200
evaluation, and each run's wall and CPU time. ``--only`` also takes the Muon learning-rate runs
``muon-lr0.01``, ``muon-lr0.005``, ``muon-lr0.0025`` and ``muon-lr0.001`` (torch.optim.Muon's
default rate), which the default set leaves out.

    python benchmarks/optimizer_perplexity.py [--only adamw,muon] [--out /tmp/opt-ppl] [--nice 10] [-- EXTRA TRAIN ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RUNS = {
    "adamw": [],
    "muon": ["--optimizer", "muon"],
    "schedule-free": ["--optimizer", "schedule-free"],
    "adafactor": ["--optimizer", "adafactor", "--lr", "1e-2"],
    "lion": ["--optimizer", "lion", "--lr", "3e-4"],
    "adamw+ema": ["--ema", "0.99"],
}
DEFAULT = list(RUNS)  # the runs without --only
# Muon at lower rates on the hidden matrices (the rest stays AdamW at --lr): the default run's
# 105k tokens are ~7.8 epochs in 400 steps, which Muon at 0.02 memorises (docs/benchmarks.md)
RUNS.update({f"muon-lr{lr}": ["--optimizer", "muon", "--muon-lr", lr] for lr in ("0.01", "0.005", "0.0025", "0.001")})


def evaluations(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated runs among {', '.join(RUNS)} (default: all)")
    ap.add_argument("--out", default="runs/opt-ppl", help="parent of the runs' output directories")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the training processes")
    ap.add_argument("extra", nargs="*", help="more `aam-func train` arguments for every run (after --)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else DEFAULT
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--only: unknown run(s) {', '.join(unknown)}; expected some of {', '.join(RUNS)}")
    rows = []
    for name in names:
        out = os.path.join(args.out, name)
        cmd = [sys.executable, "-c", "import sys; from aam_func.cli import main; sys.exit(main())", "train",
               "--output-dir", out, "--overwrite", *RUNS[name], *args.extra]
        if args.nice:
            cmd = ["nice", "-n", str(args.nice), *cmd]
        print("$ aam-func train --output-dir", out, *RUNS[name], *args.extra, flush=True)
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        os.makedirs(args.out, exist_ok=True)
        with open(out + ".log", "w") as log:  # the run's own output
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        evs = evaluations(os.path.join(out, "metrics.jsonl"))
        at200 = next((e for e in evs if e["step"] == 200), None)
        rows.append((name, evs[-1], at200, wall, cpu))
        print(f"{name}: held-out loss {evs[-1]['val_loss']:.4f}, perplexity {evs[-1]['val_perplexity']:.2f} "
              f"(step {evs[-1]['step']}), {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    print("\n| run | held-out loss | perplexity | at step 200 | wall s | CPU s |\n|---|---|---|---|---|---|")
    for name, last, at200, wall, cpu in rows:
        mid = f"{at200['val_perplexity']:.2f}" if at200 else "-"
        print(f"| {name} | {last['val_loss']:.4f} | {last['val_perplexity']:.2f} | {mid} | {wall:.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
