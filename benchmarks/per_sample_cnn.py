"""Per-example gradients and the DP-SGD step on a small CNN (an nn.Module), against Opacus and
a non-private step, in one process.

Model: examples/cnn_dp.py's CNN (Conv2d 1→16 + GroupNorm + Conv2d 16→32 + GroupNorm + Linear
128→10, 8×8 inputs), float32, CPU. Cases (each at every --batch):

  ours_grads      aam_func.per_sample.grads (method "auto" = ghost: conv / linear weights from
                  their factors, GroupNorm affine and biases exact through vmap)
  ours_grads_vmap per_sample.grads(method="vmap")
  opacus_hooks    Opacus GradSampleModule (hooks): forward, backward of the summed loss, every
                  parameter's grad_sample
  nonprivate      torch.func.grad of the batch loss + the Adam update (aam_func.optim)
  dp_step         per_sample.dp_sgd step (ghost norms, clipped sum, noise, the same Adam update)
  ours_grads_batched  per_sample.grads(method="batched") on the (B,) per-example losses
                  (reduction="none"): one batched forward and backward to probes, no vmap
  dp_step_batched per_sample.dp_sgd(method="batched") on those losses: the same step otherwise
  fwd_bwd         torch.func.grad of the batch loss alone: one batched forward and backward with
                  no per-example work, the floor any per-example route sits above

Printed ratios: ours_grads / opacus_hooks (goal ≤ 0.7), dp_step / nonprivate (goal ≤ 1.5) and
fwd_bwd / opacus_hooks (how much of Opacus's time a plain forward + backward already takes).
--phases also times the ghost route's parts, interleaved the same way: discovery (the loss on
the first example), the vmapped pass (forward with probes, backward that gives the factors and
the exact per-example gradients of the other leaves) and ghost_grads (the pass and the write of
the factors into the result).

The cases run interleaved, --reps rounds after a warm-up, each round in a fresh random order
(seeded: a fixed order hands every case the same predecessor, and what ran just before a case
changes its time through the caches); medians and minima are printed, with the ratios of
medians, of minima and the median of per-round ratios (each round runs every case back to back,
so its ratio sees the same outside load: the steadiest figure when the CPU is shared).
--cases times a subset.

    OMP_NUM_THREADS=1 python benchmarks/per_sample_cnn.py              # batch 64, 15 rounds
    python benchmarks/per_sample_cnn.py --batch 32 64 128 --reps 9
    OMP_NUM_THREADS=1 python benchmarks/per_sample_cnn.py --phases --reps 21
    OMP_NUM_THREADS=1 python benchmarks/per_sample_cnn.py --reps 61 --clock cpu --cases opacus_hooks ours_grads_batched fwd_bwd
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from aam_func import optim, per_sample as ps  # noqa: E402
from cnn_dp import cnn  # noqa: E402


def problem(batch_size: int):
    """(model, params, batch, loss_fn): the CNN, its named_parameters() dict, a random batch."""
    torch.manual_seed(0)
    model = cnn()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(batch_size, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (batch_size,), generator=g)}

    def loss_fn(p, b):
        return F.cross_entropy(functional_call(model, p, (b["x"],)), b["y"])

    return model, params, batch, loss_fn


def example_losses(model):
    """The (B,) per-example losses the batched route takes (reduction="none")."""
    return lambda p, b: F.cross_entropy(functional_call(model, p, (b["x"],)), b["y"], reduction="none")


def cases(batch_size: int) -> dict:
    model, params, batch, loss_fn = problem(batch_size)
    opt = optim.adam(1e-3)
    state = opt.init({k.replace(".", "_"): v for k, v in params.items()})  # optim takes nested dicts today
    flat_key = {k: k.replace(".", "_") for k in params}

    def nonprivate():
        grads = torch.func.grad(loss_fn)(params, batch)
        updates, _ = opt.update({flat_key[k]: v for k, v in grads.items()}, state)
        return optim.apply_updates({flat_key[k]: v for k, v in params.items()}, updates)

    step = ps.dp_sgd(lambda p, b: loss_fn({k: p[flat_key[k]] for k in params}, b), opt, max_norm=1.0,
                     noise_multiplier=1.0, expected_batch_size=batch_size)
    noise = torch.Generator().manual_seed(2)
    nested = {flat_key[k]: v for k, v in params.items()}

    per_ex = example_losses(model)
    step_b = ps.dp_sgd(lambda p, b: per_ex({k: p[flat_key[k]] for k in params}, b), opt, max_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=batch_size, method="batched")
    out = {
        "ours_grads": lambda: ps.grads(loss_fn, params, batch),
        "ours_grads_batched": lambda: ps.grads(per_ex, params, batch, method="batched"),
        "dp_step_batched": lambda: step_b(nested, state, batch, noise),
        "ours_grads_vmap": lambda: ps.grads(loss_fn, params, batch, method="vmap"),
        "nonprivate": nonprivate,
        "dp_step": lambda: step(nested, state, batch, noise),
        "fwd_bwd": lambda: torch.func.grad(loss_fn)(params, batch),
    }
    try:
        from opacus import GradSampleModule
    except ImportError:  # the opacus extra
        print("opacus not installed: opacus_hooks skipped")
        return out
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

    def opacus_hooks():
        for p in gsm.parameters():
            p.grad, p.grad_sample = None, None
        F.cross_entropy(gsm(batch["x"]), batch["y"], reduction="sum").backward()
        return [p.grad_sample for p in gsm.parameters()]

    out["opacus_hooks"] = opacus_hooks
    return out


def phases(batch_size: int) -> dict:
    """The ghost route's parts on the same problem (see the module docstring)."""
    from aam_func.per_sample import ghost

    _, params, batch, loss_fn = problem(batch_size)
    d = ghost.discover(loss_fn, params, batch)
    return {
        "discover": lambda: ghost.discover(loss_fn, params, batch),
        "pass": lambda: ghost.ghost_pass(loss_fn, params, batch, d),
        "ghost_grads": lambda: ghost.ghost_grads(loss_fn, params, batch, None, d),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timed(fns: dict, reps: int, clock: str = "wall", seed: int = 0) -> dict:
    """{case: [seconds per round]}: every function once per round, ``reps`` rounds after a warm-up.
    ``clock="cpu"``: this thread's CPU time (with one thread, torch's kernels and the CPU
    autograd engine run on it), which other processes' load does not inflate as it does wall time.

    Each round runs the cases in a fresh random order (seeded): a case's time depends on what ran
    just before it (what its predecessor left in the caches), and a fixed order would give every
    case the same predecessor in every round, a bias the shuffle spreads evenly over the cases."""
    now = CLOCKS[clock]
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            t = now()
            fns[k]()
            times[k].append(now() - t)
    return times


RATIOS = (  # (numerator, denominator, note)
    ("ours_grads", "opacus_hooks", "goal <= 0.7"),
    ("ours_grads_vmap", "opacus_hooks", "the vmap route"),
    ("ours_grads_batched", "opacus_hooks", "the batched route; goal <= 0.7"),
    ("dp_step_batched", "nonprivate", "the batched route; goal <= 1.5"),
    ("fwd_bwd", "opacus_hooks", "no per-example work"),
    ("dp_step", "nonprivate", "goal <= 1.5"),
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--phases", action="store_true", help="also time the ghost route's parts")
    ap.add_argument("--cases", nargs="+", default=None, help="time only these cases (default: all)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this thread's CPU time (steadier on a shared machine; use with OMP_NUM_THREADS=1)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    for B in args.batch:
        fns = cases(B)
        if args.phases:
            fns.update(phases(B))
        if args.cases:
            unknown = sorted(set(args.cases) - set(fns))
            if unknown:
                ap.error(f"--cases: unknown {unknown}; the cases are {sorted(fns)}")
            fns = {k: v for k, v in fns.items() if k in args.cases}
        times = timed(fns, args.reps, args.clock)
        print(f"\nbatch {B} ({args.reps} rounds): median ms (min)")
        for k, v in times.items():
            print(f"  {k:16s} {statistics.median(v) * 1e3:8.2f}  ({min(v) * 1e3:.2f})")
        print("  ratios: of medians, of minima, median of the per-round ratios")
        for num, den, note in RATIOS:
            if num in times and den in times:
                a, b = times[num], times[den]
                per_round = statistics.median(x / y for x, y in zip(a, b))
                print(f"  {num + ' / ' + den:32s} {statistics.median(a) / statistics.median(b):.2f}x  "
                      f"{min(a) / min(b):.2f}x  {per_round:.2f}x   ({note})")


if __name__ == "__main__":
    main()
