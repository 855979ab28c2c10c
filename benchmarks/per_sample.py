"""Per-example gradients and the DP-SGD step on a GPT-2-shaped model, against the anchors.

Model: 4 layers, d_model 256, 8 heads, T 128, vocab 8192 (tied embeddings), float32, CPU.
Cases (each at every --batch):

  loop            Python loop of torch.func.grad over examples (the anchor for full grads)
  ghost           aam_func.per_sample.grads (default method "auto" = "ghost" here): bmm(gᵀ, x)
                  of the ghost pass's factors written into the preallocated result, default chunk
  ghost_chunk     per_sample.grads(chunk_size=--chunk), the ghost method
  vmap            per_sample.grads(method="vmap"), one vmap over the batch
  vmap_chunk      per_sample.grads(method="vmap", chunk_size=--chunk): one chunk at a time
  opacus_hooks    Opacus GradSampleModule (hooks) on the equivalent transformers GPT2LMHeadModel
  nonprivate      grad of the batch loss + an SGD update (the anchor for the DP step)
  dp_ghost        per_sample.dp_sgd step: ghost norms + reweighted sum + noise + SGD update
  opacus_ghost    Opacus fast gradient clipping (grad_sample_mode="ghost") step on the GPT-2
                  (untied lm_head: Opacus ghost clipping does not support tied parameters)

Times: the cases run round-robin (interleaved) --reps times after one warm-up each, and the
median and the minimum are reported, because the 2-core CPU is shared with other jobs: the
median when fewer than half the rounds are disturbed, the minimum (each case's least disturbed
run) when bursts of outside load hit most rounds.

Peak memory: each case runs once per fresh subprocess (--mem-reps subprocesses, median). After
setup (model, inputs, wrappers) and an optional baseline step, the peak-RSS counter is reset
(/proc/self/clear_refs = 5) and VmHWM is read after the case, so the figure is the case's own
peak above that baseline; "result" = B x params x 4 bytes. Baselines (--mem-base, several
allowed; each is applied identically to every case, before the peak counter is reset):

  fresh      nothing: the first call in a fresh process (it pays torch's one-time costs: the
             first torch.func call imports torch._dynamo, sympy and friends, ~70 MiB, which the
             Opacus cases have already paid in setup because transformers imports them; kernel
             code pages; the allocator's first growth)
  func       one tiny torch.func.grad call first (torch's first-use import only)
  forward    "func" and one no-grad forward of one example with the case's own model
  ordinary   one ordinary non-private forward+backward of one example with the case's own model
             and its own training API (torch.func.grad for ours, loss.backward() on the
             transformers model before Opacus wraps it), gradients dropped: "above the model's
             own", since every user of per-example gradients has run the model's training code
  second     the case itself once, result dropped (the second call; = --mem-warm)

Default: fresh and ordinary. Figures go in docs/benchmarks.md.

    python benchmarks/per_sample.py                      # batch 16 and 32, times and memory
    python benchmarks/per_sample.py --batch 8 --reps 1 --no-mem   # a quick look
    python benchmarks/per_sample.py --cases loop ghost opacus_hooks --no-time --mem-base fresh func forward ordinary

"second" is comparable only for cases whose big allocations are fresh (the ghost/vmap results
are single large tensors); the loop's and Opacus's many small tensors reuse the freed heap and
read near zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aam_func as af  # noqa: E402
from _memory import peak, reset_peak, rss_now, rss_parts  # noqa: E402
from aam_func import optim, per_sample as ps, tree  # noqa: E402

V, D, L, H, T = 8192, 256, 4, 8, 128
BASES = ["fresh", "func", "forward", "ordinary", "second"]
CASES = ["loop", "ghost", "ghost_chunk", "vmap", "vmap_chunk", "opacus_hooks", "nonprivate", "dp_ghost", "opacus_ghost"]


def our_model(backend: str):
    cfg = af.ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=T, dropout=0.0, attention_backend=backend)
    return af.Transformer(cfg)


def hf_model(tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def first_func_use():
    """torch's one-time cost of the first torch.func call (it imports torch._dynamo and sympy)."""
    torch.func.grad(lambda x: (x * x).sum())(torch.ones(3))


def baseline(base: str, forward, ordinary) -> None:
    """Bring the process to the ``base`` state (see the module docstring); ``forward()`` runs the
    case's model on one example, ``ordinary()`` does one ordinary forward+backward of one example."""
    if base in ("func", "forward"):
        first_func_use()
    if base == "forward":
        with torch.no_grad():
            forward()
    elif base == "ordinary":
        ordinary()


def setup(case: str, B: int, chunk: int, backend: str, base: str = "fresh"):
    """Build everything a case needs (and bring the process to ``base``); returns (run, result_bytes)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    if case.startswith("opacus"):
        return setup_opacus(case, ids, base)
    model = our_model("auto" if case in ("loop", "nonprivate") else backend)
    params = model.init(seed=0)
    batch = {"input_ids": ids, "labels": ids}
    loss = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731
    result_bytes = B * tree.count(params) * 4
    one = {"input_ids": ids[:1], "labels": ids[:1]}
    baseline(base, lambda: loss(params, one), lambda: torch.func.grad(loss)(params, one))
    if case == "loop":
        grad = torch.func.grad(loss)

        def run():
            return [grad(params, {"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]}) for i in range(B)]
    elif case == "ghost":
        run = lambda: ps.grads(loss, params, batch)  # noqa: E731
    elif case == "ghost_chunk":
        run = lambda: ps.grads(loss, params, batch, chunk_size=chunk, method="ghost")  # noqa: E731
    elif case == "vmap":
        run = lambda: ps.grads(loss, params, batch, method="vmap")  # noqa: E731
    elif case == "vmap_chunk":
        run = lambda: ps.grads(loss, params, batch, chunk_size=chunk, method="vmap")  # noqa: E731
    elif case == "nonprivate":
        opt = optim.sgd(0.1)
        state = opt.init(params)
        grad = torch.func.grad(loss)

        def run():
            u, _ = opt.update(grad(params, batch), state, params)
            return optim.apply_updates(params, u)
    elif case == "dp_ghost":
        opt = optim.sgd(0.1)
        state = opt.init(params)
        step = ps.dp_sgd(loss, opt, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=B)
        gen = torch.Generator().manual_seed(0)
        run = lambda: step(params, state, batch, gen)[0]  # noqa: E731
    else:
        raise ValueError(case)
    return run, result_bytes


def setup_opacus(case, ids, base="fresh"):
    from opacus import GradSampleModule, PrivacyEngine

    B = ids.shape[0]
    # explicit (B, T) position ids: with GPT-2's default (1, T) ones Opacus computes the position
    # table's per-sample gradient with batch size 1 (and ghost clipping fails on the mismatch)
    pos = torch.arange(T).expand(B, T).contiguous()
    # Opacus ghost clipping refuses tied parameters ("Parameter tying is not supported"): its
    # GPT-2 is untied (one more V x d matrix than ours); the hooks case keeps the tie.
    hf = hf_model(tied=case == "opacus_hooks")
    result_bytes = B * sum(p.numel() for p in hf.parameters()) * 4

    def ordinary():  # the transformers model's own training step, before Opacus wraps it
        hf(input_ids=ids[:1], position_ids=pos[:1], labels=ids[:1]).loss.backward()
        hf.zero_grad(set_to_none=True)

    baseline(base, lambda: hf(input_ids=ids[:1], position_ids=pos[:1], labels=ids[:1]), ordinary)
    if case == "opacus_hooks":
        gsm = GradSampleModule(hf)

        def run():
            for p in hf.parameters():
                p.grad, p.grad_sample = None, None
            gsm(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
            return [p.grad_sample for p in hf.parameters()]

        return run, result_bytes
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=B)
    sgd = torch.optim.SGD(hf.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, crit, _ = engine.make_private(
        module=hf, optimizer=sgd, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False,
    )

    def run():
        opt.zero_grad()
        logits = model(input_ids=ids, position_ids=pos).logits[:, :-1]
        loss = crit(logits.reshape(-1, V), ids[:, 1:].reshape(-1), shape=logits.shape)
        loss.backward()
        opt.step()

    return run, result_bytes


def measure_memory(case, B, chunk, backend, base="fresh"):
    """Run in a fresh process: peak RSS of one call above the ``base`` state (see the module
    docstring), and how much of the resident growth is file pages (code) and anonymous memory."""
    run, result_bytes = setup(case, B, chunk, backend, "fresh" if base == "second" else base)
    if base == "second":
        run()
    before, parts0 = rss_now(), rss_parts()
    reset_peak()
    out = run()
    top, parts1 = peak(), rss_parts()
    del out
    mib = 2.0**20
    return {"case": case, "batch": B, "base": base, "peak_mib": (top - before) / mib, "result_mib": result_bytes / mib,
            "code_mib": (parts1.get("file", 0) - parts0.get("file", 0)) / mib}


def memory_row(args, case, B, base):
    """Median over ``--mem-reps`` fresh processes; returns (median peak MiB, runs, result MiB, code MiB)."""
    runs, result, code = [], None, []
    for _ in range(args.mem_reps):
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-case", case, "--batch", str(B), "--chunk", str(args.chunk),
               "--backend", args.backend, "--threads", str(args.threads), "--mem-base", base]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r["peak_mib"])
        result = r["result_mib"]
        code.append(r["code_mib"])
    return statistics.median(runs), runs, result, statistics.median(code)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--backend", default="math", choices=["math", "auto"], help="attention backend under vmap")
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--mem-base", nargs="+", default=["fresh", "ordinary"], choices=BASES,
                    help="state of the process when the peak counter is reset (see above)")
    ap.add_argument("--mem-reps", type=int, default=3, help="fresh processes per memory figure (median)")
    ap.add_argument("--mem-warm", action="store_true", help="same as --mem-base second")
    ap.add_argument("--mem-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.mem_warm:
        args.mem_base = ["second"]
    if args.mem_case:
        print(json.dumps(measure_memory(args.mem_case, args.batch[0], args.chunk, args.backend, args.mem_base[0])))
        return
    print(f"model: {L} layers, d {D}, heads {H}, T {T}, vocab {V}; torch {torch.__version__}, {args.threads} threads, "
          f"vmap attention backend {args.backend!r}")
    for B in args.batch:
        if not args.no_time:
            runs = {c: setup(c, B, args.chunk, args.backend)[0] for c in args.cases}
            for c in args.cases:
                runs[c]()  # warm-up
            times = {c: [] for c in args.cases}
            for _ in range(args.reps):
                for c in args.cases:
                    t0 = time.perf_counter()
                    runs[c]()
                    times[c].append(time.perf_counter() - t0)
            med = {c: statistics.median(v) for c, v in times.items()}
            best = {c: min(v) for c, v in times.items()}
            print(f"\nbatch {B}: {args.reps} interleaved runs (s): median, min (the least disturbed run)")
            for c in args.cases:
                print(f"  {c:14s} {med[c]:7.3f} {best[c]:7.3f}   runs {' '.join(f'{t:.2f}' for t in times[c])}")
            pairs = [("ghost", "loop"), ("ghost", "opacus_hooks"), ("ghost_chunk", "loop"), ("ghost_chunk", "opacus_hooks"),
                     ("vmap", "loop"), ("vmap_chunk", "loop"), ("vmap_chunk", "opacus_hooks"),
                     ("dp_ghost", "nonprivate"), ("dp_ghost", "opacus_ghost")]
            shown = [f"{a} / {b} {med[a] / med[b]:.2f}x ({best[a] / best[b]:.2f}x)" for a, b in pairs if a in med and b in med]
            if shown:
                print("  ratios of medians (of mins): " + ", ".join(shown))
            del runs
        if not args.no_mem:
            print(f"batch {B}: peak RSS of one call above the baseline (MiB), median of {args.mem_reps} fresh processes; "
                  "result = B x params x 4 bytes; code = file pages the call touched")
            for base in args.mem_base:
                print(f"  baseline {base!r}")
                for c in args.cases:
                    try:
                        med, runs, result, code = memory_row(args, c, B, base)
                    except RuntimeError as e:
                        print(f"    {c:14s} failed: {e}")
                        continue
                    print(f"    {c:14s} {med:8.1f}   ({med / result:.2f}x result of {result:.0f} MiB; code {code:5.1f})   "
                          f"runs {' '.join(f'{x:.0f}' for x in runs)}")

if __name__ == "__main__":
    main()
