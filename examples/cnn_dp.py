"""DP-SGD on a small CNN (Conv2d + GroupNorm + Linear, an ordinary nn.Module) on scikit-learn's
bundled 8×8 digits (shipped inside scikit-learn: nothing is downloaded), printing test accuracy
and ε.

The module stays an nn.Module: the loss calls it through ``torch.func.functional_call`` with the
params, whose names are the module's ``named_parameters()`` names. Per-example clipping uses ghost
norms (the conv and linear weights never get a per-example gradient; the GroupNorm affine and the
biases get exact ones through vmap), Poisson-sampled batches, Gaussian noise from an explicit
generator and the RDP accountant. A BatchNorm in place of the GroupNorm is refused by name: it
mixes the examples of a batch.

    pip install -e '.[examples]'
    python examples/cnn_dp.py            # 15 epochs (352 steps): ~93% test accuracy at ε=4, well under a minute
    python examples/cnn_dp.py --target-epsilon 2 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aam_func import optim, per_sample as ps, privacy, tree  # noqa: E402


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AvgPool2d(2),   # 16 × 4 × 4
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.AvgPool2d(2),  # 32 × 2 × 2
        nn.Flatten(), nn.Linear(128, 10),
    )


def digits(seed: int, n_test: int):
    from sklearn.datasets import load_digits  # the examples extra

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=15)
    ap.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--target-epsilon", type=float, default=4.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    (x, y), (x_test, y_test) = digits(args.seed, n_test=297)
    N = len(y)
    q = args.batch_size / N
    steps = max(1, round(args.epochs / q))
    sigma = privacy.noise_multiplier_for(args.target_epsilon, steps, q, args.delta)
    print(f"{N} training images, q={q:.4f}, {steps} steps, C={args.max_norm}: "
          f"noise multiplier σ={sigma:.3f} for ε={args.target_epsilon} at δ={args.delta}")

    model = cnn()
    params = tree.unflatten({k: v.detach() for k, v in model.named_parameters()})  # {"0": {"weight": ...}, ...}

    def logits(p, images):
        return functional_call(model, tree.flatten(p), (images,))  # flattened: the module's own names

    def loss_fn(p, batch):
        return F.cross_entropy(logits(p, batch["x"]), batch["y"])

    def accuracy(p):
        with torch.no_grad():
            return (logits(p, x_test).argmax(-1) == y_test).float().mean().item()

    opt = optim.adam(args.lr)
    state = opt.init(params)
    step = ps.dp_sgd(loss_fn, opt, max_norm=args.max_norm, noise_multiplier=sigma, expected_batch_size=q * N)
    sampler, noise = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    print(f"step 0: test accuracy {accuracy(params):.3f}")
    start = time.perf_counter()
    for t in range(1, steps + 1):
        idx = ps.poisson_sample(N, q, sampler)
        params, state, info = step(params, state, {"x": x[idx], "y": y[idx]}, noise)
        if t % max(1, steps // 5) == 0 or t == steps:
            eps = privacy.epsilon(t, q, sigma, args.delta)
            print(f"step {t}: batch {info.batch_size}, loss {float(info.loss):.3f}, "
                  f"median norm {float(info.norms.median()) if info.batch_size else float('nan'):.2f}, "
                  f"test accuracy {accuracy(params):.3f}, ε={eps:.2f}")
    print(f"{steps} DP-SGD steps in {time.perf_counter() - start:.1f}s; final test accuracy {accuracy(params):.3f} "
          f"at (ε={privacy.epsilon(steps, q, sigma, args.delta):.2f}, δ={args.delta})")


if __name__ == "__main__":
    main()
