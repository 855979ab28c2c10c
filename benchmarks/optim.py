"""AdamW update time: aam_func.optim.adamw (update + apply_updates, out of place) against
torch.optim.AdamW(foreach=True) (in place), on the same ~10M-parameter transformer-shaped tree,
measured in the same run. Prints medians and the ratio ours / torch (lower is better).

    python benchmarks/optim.py [--steps 30] [--d-model 256] [--layers 8] [--vocab 8192] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aam_func import optim, tree


def make_params(vocab: int, d: int, layers: int, gen: torch.Generator) -> dict:
    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    blocks = {}
    for i in range(layers):
        blocks[str(i)] = {
            "ln1": {"weight": torch.ones(d), "bias": torch.zeros(d)},
            "attn": {"qkv": {"weight": w(3 * d, d), "bias": torch.zeros(3 * d)},
                     "proj": {"weight": w(d, d), "bias": torch.zeros(d)}},
            "ln2": {"weight": torch.ones(d), "bias": torch.zeros(d)},
            "mlp": {"fc": {"weight": w(4 * d, d), "bias": torch.zeros(4 * d)},
                    "proj": {"weight": w(d, 4 * d), "bias": torch.zeros(d)}},
        }
    return {"embed": {"weight": w(vocab, d)}, "blocks": blocks,
            "ln_f": {"weight": torch.ones(d), "bias": torch.zeros(d)}, "lm_head": {"weight": w(vocab, d)}}


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd update")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    params = make_params(args.vocab, args.d_model, args.layers, gen)
    grads = tree.map(lambda p: torch.randn(p.shape, generator=gen) * 1e-3, params)
    n = tree.count(params)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    print(f"params: {n / 1e6:.2f}M in {len(tree.leaves(params))} leaves; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # torch: in-place step on nn.Parameters with .grad set
    tparams = [torch.nn.Parameter(p.clone()) for p in tree.leaves(params)]
    for p, g in zip(tparams, tree.leaves(grads)):
        p.grad = g.clone()
    topt = torch.optim.AdamW(tparams, foreach=True, **hp)
    # ours: pure update + out-of-place apply
    opt = optim.adamw(hp["lr"], *hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    box = {"p": params, "s": opt.init(params)}

    def ours():
        u, box["s"] = opt.update(grads, box["s"], box["p"])
        box["p"] = optim.apply_updates(box["p"], u)

    # Interleave the two, step by step, so that load from other processes hits both alike.
    for _ in range(3):
        topt.step()
        ours()
    tt, to = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        topt.step()
        t1 = time.perf_counter()
        ours()
        t2 = time.perf_counter()
        tt.append((t1 - t0) * 1e3)
        to.append((t2 - t1) * 1e3)
    t_torch, t_ours = statistics.median(tt), statistics.median(to)
    pair = statistics.median(o / t for o, t in zip(to, tt))
    print(f"torch.optim.AdamW(foreach=True).step   median {t_torch:8.2f} ms")
    print(f"optim.adamw update + apply_updates     median {t_ours:8.2f} ms")
    print(f"ratio ours / torch (eager)             {t_ours / t_torch:8.3f}  (median of per-step ratios {pair:.3f})")

    if args.compile:
        step = torch.compile(lambda g, s, p: (lambda us: (optim.apply_updates(p, us[0]), us[1]))(opt.update(g, s, p)))

        def ours_c():
            box["p"], box["s"] = step(grads, box["s"], box["p"])

        t_c = median_ms(ours_c, args.steps)
        print(f"torch.compile(update + apply_updates)  median {t_c:8.2f} ms")
        print(f"ratio compiled ours / torch (eager)    {t_c / t_torch:8.3f}")


if __name__ == "__main__":
    main()
