"""Train an ensemble of 4 small Transformers at once (vmap over members) and check one member
against training it alone.

    python examples/ensemble.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aam_func as af  # noqa: E402
from aam_func import ensemble, optim, tree  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    cfg = af.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.0, attention_backend="math")
    model = af.Transformer(cfg)
    loss_fn = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731
    opt = optim.adamw(3e-3, weight_decay=0.01)

    seeds = list(range(args.members))
    params = ensemble.init(model, seeds)  # leaves (members, *shape)
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss_fn, opt)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (8, 24), generator=g) for _ in range(args.steps)]
    for t, ids in enumerate(batches, 1):
        params, state, losses = step(params, state, {"input_ids": ids, "labels": ids})
        if t % 5 == 0:
            print(f"step {t}: member losses {[round(float(x), 3) for x in losses]}")

    # member 0 trained alone with the same batches
    p, s = model.init(seed=0), opt.init(model.init(seed=0))
    for ids in batches:
        b = {"input_ids": ids, "labels": ids}
        u, s = opt.update(torch.func.grad(loss_fn)(p, b), s, p)
        p = optim.apply_updates(p, u)
    diff = max((a[0] - b).abs().max().item() for a, b in zip(tree.leaves(params), tree.leaves(p)))
    print(f"member 0 vs trained alone: max |difference| {diff:.2e} (float32 reduction-order noise)")


if __name__ == "__main__":
    main()
