"""Curvature costs against a gradient and a training step, with curvlinops side by side, in one
process (issue 24).

Models (float32, CPU): an MLP (784→128→64→10, batch 128), a small CNN (Conv2d 1→16→32 + Linear,
8×8 inputs, batch 64) and the tiny GPT of ``--gpt`` (aam_func's Transformer, default 4 layers,
d_model 64, vocab 256, 32 blocks of 64 tokens). Cases, interleaved --reps rounds after a warm-up:

  grad          torch.func.grad of the batch loss (one forward + backward)
  step          grad + an AdamW update (aam_func.optim): a training step
  ggn_vp        research.ggn_vp (one jvp + one vjp)
  hvp           research.hessian_vp (jvp over grad)
  kfac          research.kfac.collect(fisher="empirical"): factors of every linear-like use
  kfac_mc       kfac.collect(fisher="mc", samples=1)
  cl_ggn_vp     curvlinops GGNLinearOperator @ v      (MLP / CNN only: nn.Modules)
  cl_kfac       curvlinops KFACLinearOperator(fisher_type="empirical").compute_kronecker_factors()

Printed: medians, and the ratios ggn_vp / grad (target ≤ 3), kfac / step (target ≤ 2),
ours / curvlinops.

    OMP_NUM_THREADS=1 python benchmarks/curvature.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import aam_func as af
from aam_func.research import Problem, ggn_vp, hessian_vp, kfac

try:
    import curvlinops
except ImportError:  # the anchor is a test extra
    curvlinops = None


def mlp_case():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return m, torch.randn(128, 784), torch.randint(0, 10, (128,))


def cnn_case():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    return m, torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))


def module_cases(model, x, y):
    apply, params, _ = af.nn.functionalize(model)
    problem = Problem(lambda p, xx: apply(p, {}, xx)[0])
    return problem, params, x, y, model


def gpt_case(layers: int):
    cfg = af.ModelConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, d_ff=256, max_seq_len=64, dropout=0.0)
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    ids = torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(0))
    y = torch.cat([ids[:, 1:], torch.full((32, 1), -100)], 1)
    return Problem(lambda p, xx: model.apply(p, xx)["logits"]), params, ids, y, None


def cases(problem, params, x, y, module):
    loss = lambda p: problem.loss_value(problem.apply(p, x), y)  # noqa: E731
    v = af.tree.map(torch.randn_like, params)
    opt = af.optim.adamw(1e-3)
    state = opt.init(params)

    def step():
        g = torch.func.grad(loss)(params)
        u, _ = opt.update(g, state, params)
        return af.optim.apply_updates(params, u)

    out = {
        "grad": lambda: torch.func.grad(loss)(params),
        "step": step,
        "ggn_vp": lambda: ggn_vp(problem, params, x, y, v),
        "hvp": lambda: hessian_vp(problem, params, x, y, v),
        "kfac": lambda: kfac.collect(problem, params, x, y, fisher="empirical"),
        "kfac_mc": lambda: kfac.collect(problem, params, x, y, fisher="mc"),
    }
    if module is not None and curvlinops is not None:
        plist = list(module.parameters())
        vl = [torch.randn_like(p) for p in plist]
        G = curvlinops.GGNLinearOperator(module, nn.CrossEntropyLoss(), plist, [(x, y)], check_deterministic=False)
        out["cl_ggn_vp"] = lambda: G @ vl

        def cl_kfac():
            K = curvlinops.KFACLinearOperator(module, nn.CrossEntropyLoss(), plist, [(x, y)], fisher_type="empirical",
                                              check_deterministic=False)
            K.compute_kronecker_factors()

        out["cl_kfac"] = cl_kfac
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def run(name, fns, reps, clock="wall"):
    """Median times of each case, run round-robin; ``clock="cpu"``: this thread's CPU time (with
    OMP_NUM_THREADS=1 the kernels and the CPU autograd engine run on it), steady under outside load."""
    now = CLOCKS[clock]
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = now()
            f()
            times[k].append(now() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"\n{name}: median ms over {reps} rounds")
    for k, v in med.items():
        print(f"  {k:10s} {v:9.2f}")
    print(f"  ggn_vp / grad = {med['ggn_vp'] / med['grad']:.2f}   hvp / grad = {med['hvp'] / med['grad']:.2f}   "
          f"kfac / step = {med['kfac'] / med['step']:.2f}   kfac_mc / step = {med['kfac_mc'] / med['step']:.2f}")
    if "cl_ggn_vp" in med:
        print(f"  ggn_vp / curvlinops = {med['ggn_vp'] / med['cl_ggn_vp']:.2f}   "
              f"kfac / curvlinops = {med['kfac'] / med['cl_kfac']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gpt", type=int, default=4, help="GPT layers (0: skip)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this thread's CPU time (use with OMP_NUM_THREADS=1 on a shared machine)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, curvlinops "
          f"{'present' if curvlinops is not None else 'absent'}")
    run("MLP 784-128-64-10, batch 128", cases(*module_cases(*mlp_case())), a.reps, a.clock)
    run("CNN 1-16-32 conv + linear, 8x8, batch 64", cases(*module_cases(*cnn_case())), a.reps, a.clock)
    if a.gpt:
        run(f"GPT {a.gpt} layers d64 vocab 256, 32x64 tokens", cases(*gpt_case(a.gpt)), a.reps, a.clock)


if __name__ == "__main__":
    main()
