"""The training run's DP-SGD step (aam_func.run.privacy) against its non-private step, same process.

Model: the CLI's Transformer at a small size (default d_model 128, 2 layers, 4 heads, T 64, vocab
4096, fp32, CPU), AdamW warmup-cosine as ``aam-func train`` builds it. Cases, round-robin over
--reps rounds after one warm-up each (median and minimum: the CPU is shared):

  nonprivate   aam_func.train.make_train_step on a batch of B blocks (the CLI's ordinary step)
  dp           aam_func.run.privacy.make_dp_train_step on the same B blocks: per-block ghost
               clipping, one noise draw, the same optimizer (the step a --dp-epsilon run takes)

    python benchmarks/dp_train_step.py                  # B 32, prints both times and the ratio
    python benchmarks/dp_train_step.py --batch 64 --attention-backend auto
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aam_func.config import ModelConfig
from aam_func.model import Transformer
from aam_func.privacy import accountant
from aam_func.run import RunConfig
from aam_func.run.privacy import DPState, make_dp_train_step
from aam_func.run.state import _train_step, run_optimizer
from aam_func.train import make_lm_loss


def build(args):
    mcfg = ModelConfig(vocab_size=4096, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       max_seq_len=args.seq_len, attention_backend=args.attention_backend)
    model = Transformer(mcfg)
    params = model.init(seed=0)
    cfg = RunConfig(steps=1000, batch_size=args.batch, seq_len=args.seq_len, precision="fp32")
    dcfg = RunConfig(steps=1000, batch_size=args.batch, seq_len=args.seq_len, precision="fp32", dp_epsilon=8.0)
    plain = _train_step(cfg, make_lm_loss(model), params, None)
    dp = DPState(accountant=accountant("rdp"), noise_multiplier=1.0, sample_rate=0.01, delta=1e-5, target=8.0,
                 n_blocks=100 * args.batch, expected=args.batch, clip=1.0, quantile=None, start=0, planned_steps=1000)
    private = make_dp_train_step(dcfg, make_lm_loss(model), params, None, dp, run_optimizer(cfg, params))
    x = torch.randint(0, 4096, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x}
    return params, batch, {"nonprivate": (plain, plain.init(params)), "dp": (private, private.init(params))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--attention-backend", default="math")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    params, batch, cases = build(args)
    times = {k: [] for k in cases}
    for name, (step, state) in cases.items():  # warm-up
        step(params, state, batch)
    for _ in range(args.reps):
        for name, (step, state) in cases.items():
            t0 = time.perf_counter()
            out = step(params, state, batch)
            float(out[2]["loss"])
            times[name].append(time.perf_counter() - t0)
    print(f"B={args.batch} T={args.seq_len} d_model={args.d_model} layers={args.n_layers} "
          f"attention={args.attention_backend} threads={torch.get_num_threads()} reps={args.reps}")
    for name, ts in times.items():
        print(f"  {name:11s} median {statistics.median(ts) * 1e3:8.1f} ms   min {min(ts) * 1e3:8.1f} ms")
    med = statistics.median(times["dp"]) / statistics.median(times["nonprivate"])
    mn = min(times["dp"]) / min(times["nonprivate"])
    print(f"  dp / nonprivate: median {med:.2f}x   min {mn:.2f}x")


if __name__ == "__main__":
    main()
