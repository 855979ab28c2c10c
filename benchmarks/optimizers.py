"""Update time of each optimizer of ``aam_func.optim`` against ``optim.adamw`` on the default
model's params (``aam-func train``'s: d_model 256, 4 layers, vocab 4096), in the same process,
and against its PyTorch reference where one is installed (torch.optim.Muon + AdamW for the
rest, torch.optim.Adafactor, schedulefree.AdamWScheduleFree). One step = ``update`` +
``apply_updates`` (out of place) for ours, ``step()`` (in place) for torch's. Prints medians,
the ratio to our AdamW (the issue's bound: ≤ 1.5x) and to the reference.

``--whole-step`` also times what a user waits for per step of ``aam-func train``: forward +
backward + update + apply, i.e. the run's own train step (``make_train_step``, bf16, clipping,
warmup-cosine) with each ``--optimizer`` of the run (``optim.run_optimizer``, its defaults), on the
default model (learnable positions, math attention, no document mask) and the default batch
shape (16x128 tokens), interleaved round by round, beside the forward + backward alone.

    python benchmarks/optimizers.py [--steps 20] [--threads 0] [--clock wall|cpu] [--only muon,lamb]
    OMP_NUM_THREADS=1 python benchmarks/optimizers.py --threads 1 --clock cpu --whole-step [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aam_func import ModelConfig, Transformer, optim, tree


CLOCK = time.perf_counter


def interleaved_times(fns, steps: int, warmup: int = 3) -> list[list[float]]:
    """Milliseconds of each call of each function, run round-robin (one call of each per round),
    so that the functions compared share the machine's conditions step by step."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            t0 = CLOCK()
            fn()
            ts.append((CLOCK() - t0) * 1e3)
    return times


def interleaved_ms(fns, steps: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each function (:func:`interleaved_times`)."""
    return [statistics.median(ts) for ts in interleaved_times(fns, steps, warmup)]


def ours_step(opt, params, grads):
    box = {"p": params, "s": opt.init(params)}

    def step():
        u, box["s"] = opt.update(grads, box["s"], box["p"])
        box["p"] = optim.apply_updates(box["p"], u)

    return step


def torch_step(make, params, grads, names=None):
    flat_p, flat_g = tree.flatten(params), tree.flatten(grads)
    names = list(flat_p) if names is None else names
    tp = [torch.nn.Parameter(flat_p[n].clone()) for n in names]
    for p, n in zip(tp, names):
        p.grad = flat_g[n].clone()
    opts = make(tp, names)
    opts = opts if isinstance(opts, list) else [opts]
    for o in opts:
        if hasattr(o, "train"):
            o.train()

    def step():
        for o in opts:
            o.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time with --threads 1, else the "
                         "process's (CPU time is what a loaded machine does not inflate)")
    ap.add_argument("--only", default="", help="comma-separated optimizer names to time (adamw is always timed)")
    ap.add_argument("--whole-step", action="store_true",
                    help="after the update times, time whole train steps of the default run with each --optimizer "
                         "(--only then names run optimizers: muon,adafactor,schedule-free,lion,adamw+ema)")
    ap.add_argument("--whole-step-only", action="store_true", help="--whole-step without the update times")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, d_ff=1024, max_seq_len=128)
    params = Transformer(cfg).init(seed=0)
    gen = torch.Generator().manual_seed(1)
    grads = tree.map(lambda p: torch.randn(p.shape, generator=gen) * 1e-3, params)
    if args.whole_step_only:
        whole_step(args.steps, args.only)
        return
    print(f"params: {tree.count(params) / 1e6:.2f}M in {len(tree.leaves(params))} leaves; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps, {args.clock} clock")
    flat = tree.flatten(params)
    muon_names = [n for n, x in flat.items() if optim.muon_rule(n, x)]
    rest = [n for n in flat if n not in muon_names]

    def torch_muon(tp, names):
        by = dict(zip(names, tp))
        return [torch.optim.Muon([by[n] for n in muon_names], lr=0.02),
                torch.optim.AdamW([by[n] for n in rest], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)]

    refs = {"muon": torch_muon, "adafactor": lambda tp, n: torch.optim.Adafactor(tp, lr=1e-2)}
    try:
        import schedulefree

        refs["schedule_free_adamw"] = lambda tp, n: schedulefree.AdamWScheduleFree(tp, lr=2.5e-3)
    except ImportError:
        print("schedulefree not installed: no reference for schedule_free_adamw (pip install schedulefree)")
    ours = {
        "adamw": optim.adamw(1e-3, weight_decay=0.1),
        "muon": optim.muon(0.02),
        "muon(ns_dtype=float32)": optim.muon(0.02, ns_dtype=torch.float32),
        "adafactor": optim.adafactor(1e-2),
        "schedule_free_adamw": optim.schedule_free_adamw(2.5e-3),
        "lion": optim.lion(1e-4),
        "lamb": optim.lamb(1e-3),
        "lars": optim.lars(1.0),
        "ema(adamw)": optim.ema(optim.adamw(1e-3, weight_decay=0.1), 0.999),
        "lookahead(adamw)": optim.lookahead(optim.adamw(1e-3, weight_decay=0.1)),
    }
    if args.only:
        keep = {"adamw", *args.only.split(",")}  # adamw: the baseline every row runs against
        ours = {k: v for k, v in ours.items() if k in keep}
    # each optimizer runs interleaved with its own AdamW copy (and its reference): the ratio
    # compares steps taken under the same load
    print(f"{'optimizer':22s} {'ours ms':>9s} {'adamw ms':>9s} {'/ adamw':>8s} {'reference ms':>13s} {'ours / ref':>10s}")
    for name, opt in ours.items():
        if name == "adamw":
            continue
        fns = [ours_step(ours["adamw"], params, grads), ours_step(opt, params, grads)]
        if name in refs:
            fns.append(torch_step(refs[name], params, grads))
        ts = interleaved_ms(fns, args.steps)
        base, t = ts[0], ts[1]
        ref_txt = f"{ts[2]:13.2f} {t / ts[2]:10.2f}" if name in refs else f"{'-':>13s} {'-':>10s}"
        print(f"{name:22s} {t:9.2f} {base:9.2f} {t / base:8.2f} {ref_txt}", flush=True)
    if "muon" in ours:
        newton_schulz_floor(flat, muon_names, args.steps)
    if args.whole_step:
        whole_step(args.steps, args.only)


def newton_schulz_floor(flat, muon_names, steps: int) -> None:
    """Muon's Newton–Schulz alone (bf16, as torch.optim.Muon): its time, its matmul FLOPs
    (5 iterations of 4 m²n + 2 m³ for an m×n matrix, m ≤ n) and the rate it runs at."""
    from aam_func.optim.muon import orthogonalize

    mats = [torch.randn_like(flat[n]) for n in muon_names]
    flops = sum(5 * (4 * min(m.shape) ** 2 * max(m.shape) + 2 * min(m.shape) ** 3) for m in mats)
    (t,) = interleaved_ms([lambda: [orthogonalize(m) for m in mats]], steps)
    print(f"muon's Newton-Schulz alone ({len(mats)} matrices, bf16): {t:.2f} ms for {flops / 1e9:.2f} GFLOP "
          f"= {flops / t / 1e6:.0f} GFLOP/s")


def whole_step(steps: int, only: str = "") -> None:
    """Whole train steps of the default run (``aam-func train --no-document-mask``): its model,
    batch shape, precision and optimizers (``optim.run_optimizer`` with the run's defaults: lr
    2e-3, Muon 0.02, warmup 40 of 400 steps, cosine to lr/10, wd 0.1, clipping 1.0; ``adamw+ema``:
    ``--ema 0.99``), all interleaved with the forward + backward alone; prints each step's median
    and its ratio to AdamW's step (the per-step cost a user feels)."""
    from aam_func.run.config import RunConfig, attention_backend
    from aam_func.train import _grad_fn, make_lm_loss, make_train_step  # _grad_fn: the step's own gradient

    rc = RunConfig()
    precision = "bf16"  # what --precision auto resolves to on this machine (AMX / AVX512-BF16)
    mcfg = ModelConfig(vocab_size=rc.vocab_size, d_model=rc.d_model, n_layers=rc.n_layers, n_heads=rc.n_heads,
                       d_ff=rc.d_ff, max_seq_len=rc.seq_len, dropout=rc.dropout, attention_dropout=0.0,
                       attention_backend=attention_backend(None, precision, "cpu"),
                       position_encoding=rc.position_encoding, learning_rate=rc.lr, weight_decay=rc.weight_decay,
                       max_grad_norm=rc.max_grad_norm, mixed_precision=True)
    model = Transformer(mcfg)
    params = model.init(seed=rc.seed)
    gen = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, rc.vocab_size, (rc.batch_size, rc.seq_len), generator=gen)}
    loss_fn = make_lm_loss(model)
    names = ["adamw", "muon", "adafactor", "schedule-free", "lion", "adamw+ema"]
    if only:
        keep = {"adamw", *only.split(",")}
        names = [n for n in names if n in keep]
    lrs = {"adafactor": 1e-2, "lion": 3e-4}  # the rates docs/benchmarks.md's perplexity runs use
    fns, labels = [], []
    for name in names:
        opt = optim.run_optimizer(params, optimizer=name.split("+")[0], learning_rate=lrs.get(name, rc.lr),
                                  total_steps=rc.steps, warmup_steps=rc.steps // 10,
                                  end_value=lrs.get(name, rc.lr) / 10, weight_decay=rc.weight_decay,
                                  max_grad_norm=rc.max_grad_norm, ema=0.99 if name.endswith("+ema") else None,
                                  muon_learning_rate=rc.muon_lr, muon_momentum=rc.muon_momentum)
        step = make_train_step(loss_fn, opt, precision=precision)
        box = {"p": params, "s": step.init(params)}

        def one(step=step, box=box):
            box["p"], box["s"], _ = step(box["p"], box["s"], batch)

        fns.append(one)
        labels.append(name)
    grad_fn = _grad_fn(loss_fn, precision, with_buffers=False)

    def fwd_bwd():
        grad_fn(params, batch, None, None)

    fns.append(fwd_bwd)
    labels.append("forward+backward only")
    print(f"whole train step: {tree.count(params) / 1e6:.2f}M params, batch {rc.batch_size}x{rc.seq_len}, "
          f"{precision}, {mcfg.attention_backend} attention, {torch.get_num_threads()} threads, {steps} timed rounds")
    raw = interleaved_times(fns, steps, warmup=2)
    ts = [statistics.median(r) for r in raw]
    base, fb = ts[0], ts[-1]
    print(f"{'optimizer':22s} {'step ms':>9s} {'/ adamw step':>13s} {'per-round ratio':>16s} {'step - fwd/bwd ms':>18s}")
    for label, t, r in zip(labels, ts, raw):
        per_round = statistics.median(a / b for a, b in zip(r, raw[0]))  # each round's ratio to AdamW's step
        print(f"{label:22s} {t:9.1f} {t / base:13.2f} {per_round:16.2f} {t - fb:18.1f}", flush=True)


if __name__ == "__main__":
    main()
