"""DP-SGD fine-tuning of a small aam_func Transformer on a small text, printing ε as it goes.

Full fine-tuning (every parameter) with Poisson-sampled batches, per-example clipping by ghost
norms (no per-example gradient is formed), Gaussian noise from an explicit generator, and the
RDP accountant. The noise multiplier is chosen for a target ε over the planned steps.

    python examples/dp_finetune.py --steps 30 --target-epsilon 8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aam_func as af  # noqa: E402
from aam_func import optim, per_sample as ps, privacy  # noqa: E402

TEXT = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season
of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair,
we had everything before us, we had nothing before us, we were all going direct to Heaven, we were
all going direct the other way."""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    windows = data.unfold(0, args.seq, args.seq // 2)  # (N, seq): the private examples
    N = windows.shape[0]

    cfg = af.ModelConfig(vocab_size=len(chars), d_model=64, n_layers=2, n_heads=4, max_seq_len=args.seq,
                         dropout=0.0, attention_backend="math")
    model = af.Transformer(cfg)
    params = model.init(seed=args.seed)
    loss_fn = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731

    sigma = privacy.noise_multiplier_for(args.target_epsilon, args.steps, args.sample_rate, args.delta)
    print(f"{N} examples, q={args.sample_rate}, {args.steps} steps, C={args.max_norm}: "
          f"noise multiplier σ={sigma:.3f} for ε={args.target_epsilon} at δ={args.delta}")

    opt = optim.adamw(args.lr, weight_decay=0.0)
    state = opt.init(params)
    step = ps.dp_sgd(loss_fn, opt, max_norm=args.max_norm, noise_multiplier=sigma,
                     expected_batch_size=args.sample_rate * N)
    sampler, noise = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    full = {"input_ids": windows, "labels": windows}
    print(f"step 0: loss on all examples {float(loss_fn(params, full)):.3f}")
    for t in range(1, args.steps + 1):
        idx = ps.poisson_sample(N, args.sample_rate, sampler)
        batch = {"input_ids": windows[idx], "labels": windows[idx]}
        params, state, info = step(params, state, batch, noise)
        if t % 10 == 0 or t == args.steps:
            eps = privacy.epsilon(t, args.sample_rate, sigma, args.delta)
            print(f"step {t}: batch {info.batch_size:2d}, loss on all examples {float(loss_fn(params, full)):.3f}, "
                  f"median clip norm {float(info.norms.median()) if info.batch_size else float('nan'):.2f}, ε={eps:.2f}")


if __name__ == "__main__":
    main()
