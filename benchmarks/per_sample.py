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
median is reported, because the 2-core CPU is shared with other jobs. Peak memory: each case
runs once in a fresh subprocess; after setup the peak-RSS counter is reset (/proc/self/clear_refs
= 5) and VmHWM is read after the case, so the figure is the case's own peak above the model,
inputs and (for Opacus) the wrapped module. Figures go in docs/benchmarks.md.

    python benchmarks/per_sample.py                      # batch 16 and 32, times and memory
    python benchmarks/per_sample.py --batch 8 --reps 1 --no-mem   # a quick look
    python benchmarks/per_sample.py --cases loop ghost opacus_hooks --no-time --mem-warm

--mem-warm measures a second call after a dropped first one (no first-call code pages and heap
growth). It is comparable only for cases whose big allocations are fresh (the ghost/vmap results
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
from aam_func import optim, per_sample as ps, tree  # noqa: E402

V, D, L, H, T = 8192, 256, 4, 8, 128
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


def setup(case: str, B: int, chunk: int, backend: str):
    """Build everything a case needs; returns (run, result_bytes)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    if case.startswith("opacus"):
        return setup_opacus(case, ids)
    model = our_model("auto" if case in ("loop", "nonprivate") else backend)
    params = model.init(seed=0)
    batch = {"input_ids": ids, "labels": ids}
    loss = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731
    result_bytes = B * tree.count(params) * 4
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


def setup_opacus(case, ids):
    from opacus import GradSampleModule, PrivacyEngine

    B = ids.shape[0]
    # explicit (B, T) position ids: with GPT-2's default (1, T) ones Opacus computes the position
    # table's per-sample gradient with batch size 1 (and ghost clipping fails on the mismatch)
    pos = torch.arange(T).expand(B, T).contiguous()
    # Opacus ghost clipping refuses tied parameters ("Parameter tying is not supported"): its
    # GPT-2 is untied (one more V x d matrix than ours); the hooks case keeps the tie.
    hf = hf_model(tied=case == "opacus_hooks")
    result_bytes = B * sum(p.numel() for p in hf.parameters()) * 4
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


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure_memory(case, B, chunk, backend, warm=False):
    """Run in a fresh process: peak RSS of one call above the state after setup (``warm``: of
    the second call, after one call whose result is dropped: the steady state of a training
    loop, without the first call's code pages and allocator growth)."""
    run, result_bytes = setup(case, B, chunk, backend)
    if warm:
        run()
    base = vm_rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = run()
    peak = vm_hwm_kib()
    del out
    return {"case": case, "batch": B, "peak_above_setup_mib": (peak - base) / 1024, "result_mib": result_bytes / 2**20}


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
    ap.add_argument("--mem-warm", action="store_true", help="memory of a second call (after one warm-up call)")
    ap.add_argument("--mem-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.mem_case:
        print(json.dumps(measure_memory(args.mem_case, args.batch[0], args.chunk, args.backend, args.mem_warm)))
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
            print(f"\nbatch {B}: median of {args.reps} interleaved runs (s)")
            for c in args.cases:
                print(f"  {c:14s} {med[c]:7.3f}   runs {' '.join(f'{t:.2f}' for t in times[c])}")
            ratio = lambda a, b: f"{med[a] / med[b]:.2f}x" if a in med and b in med else "n/a"  # noqa: E731
            print(f"  ghost / loop {ratio('ghost', 'loop')}, ghost / opacus_hooks {ratio('ghost', 'opacus_hooks')}, "
                  f"ghost_chunk / loop {ratio('ghost_chunk', 'loop')}, ghost_chunk / opacus_hooks {ratio('ghost_chunk', 'opacus_hooks')}")
            print(f"  vmap / loop {ratio('vmap', 'loop')}, vmap_chunk / loop {ratio('vmap_chunk', 'loop')}, "
                  f"vmap_chunk / opacus_hooks {ratio('vmap_chunk', 'opacus_hooks')}")
            print(f"  dp_ghost / nonprivate {ratio('dp_ghost', 'nonprivate')}, dp_ghost / opacus_ghost {ratio('dp_ghost', 'opacus_ghost')}")
            del runs
        if not args.no_mem:
            which = "the second call (after a warm-up call)" if args.mem_warm else "one call"
            print(f"batch {B}: peak RSS above setup, {which} in a fresh process (MiB); result = B x params x 4 bytes")
            for c in args.cases:
                cmd = [sys.executable, os.path.abspath(__file__), "--mem-case", c, "--batch", str(B), "--chunk", str(args.chunk),
                       "--backend", args.backend, "--threads", str(args.threads)] + (["--mem-warm"] if args.mem_warm else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(f"  {c:14s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  {c:14s} {r['peak_above_setup_mib']:8.1f}   ({r['peak_above_setup_mib'] / r['result_mib']:.2f}x result of {r['result_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
