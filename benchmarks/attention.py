"""Attention benchmark: memory and time of the blockwise op against math and SDPA (CPU).

Run:  python benchmarks/attention.py            (full: T = 1024..8192, a few minutes on 2 cores)
      python benchmarks/attention.py --quick    (T = 512..2048, for a smoke run)

Shape: batch 1, 8 heads, head_dim 64, float32, causal.

Memory. Each (backend, T) runs in a fresh Python process; it builds q, k, v, records its
resident set size (RSS), runs forward + backward once, and reports
``peak_extra = ru_maxrss - RSS before the call``: the extra memory the OS saw the attention
call (its activations, saved tensors, gradients and temporaries) take. A fresh process per
point means one point's allocator caches cannot hide another's peak. Ratios, not absolute
MiB, are the claim: blockwise should grow ~2x per doubling of T (O(T)), math ~4x (O(T^2)).

Time. In-process, one thread, CPU seconds (``time.process_time``; the machine is shared, so
wall time is unreliable), best of ``--repeats`` after one warm-up: local attention (window 256)
forward + backward should grow ~2x per doubling of T (tiles outside the band are skipped);
causal standard attention, blockwise vs F.scaled_dot_product_attention, reported as a ratio.
Ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from aam_func.ops.attention import attention  # noqa: E402

H, D = 8, 64


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, T, D, generator=g).requires_grad_() for _ in range(3)]


def _run(backend, T, **kw):
    q, k, v = _inputs(T)
    out = attention(q, k, v, causal=True, backend=backend, **kw)
    out.backward(torch.ones_like(out))


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(backend, T):
    torch.set_num_threads(2)
    _run(backend, 64)  # warm up kernels and thread pools outside the measurement
    q, k, v = _inputs(T)
    before = _rss_mib()
    out = attention(q, k, v, causal=True, backend=backend)
    out.backward(torch.ones_like(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"backend": backend, "T": T, "peak_extra_mib": peak - before}))


def measure_memory(backend, T):
    cmd = [sys.executable, __file__, "--child", backend, str(T)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def best_time(fn, repeats):
    """Best CPU seconds (process_time) of ``repeats`` calls after a warm-up, on one thread.

    CPU time rather than wall time because the benchmark machine is shared: other processes
    stretch wall time by several x at random, but barely change the CPU time we consume.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def vmap_section():
    """vmap(grad) of causal attention per backend: what ``auto`` should pick under vmap."""
    import warnings

    from torch.func import grad, vmap

    warnings.simplefilter("ignore")  # SDPA's "no batching rule" performance warning
    torch.set_num_threads(1)
    print("== vmap(grad) of causal attention, 16 examples x 4 heads x head_dim 32, CPU ms per call, 1 thread ==")
    for T in (64, 256):
        q, k, v = (torch.randn(16, 4, T, 32) for _ in range(3))
        row = []
        for backend in ("sdpa", "math", "blockwise"):
            f = lambda q, k, v: attention(q[None], k[None], v[None], causal=True, backend=backend).sum()
            fn = vmap(grad(f, argnums=(0, 1, 2)))
            row.append(f"{backend} {best_time(lambda: fn(q, k, v), 3) * 1e3:.1f}")
        print(f"T={T:4d}: " + ", ".join(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vmap-only", action="store_true", help="only the auto-under-vmap comparison")
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    if args.vmap_only:
        return vmap_section()
    torch.set_num_threads(2)
    Ts = [512, 1024, 2048] if args.quick else [1024, 2048, 4096, 8192]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 1, heads {H}, head_dim {D}, float32, causal\n")

    print("== peak extra memory of forward+backward (MiB, fresh process per point) ==")
    mem = {}
    for backend in ("blockwise", "math"):
        for T in Ts:
            mem[backend, T] = measure_memory(backend, T)
            m = mem[backend, T]
            print(f"{backend:9s} T={T:5d}: " + ("failed" if m is None else f"{m:9.1f} MiB"), flush=True)
    for backend in ("blockwise", "math"):
        growth = [mem[backend, b] / mem[backend, a] for a, b in zip(Ts, Ts[1:]) if mem[backend, a] and mem[backend, b]]
        print(f"{backend:9s} growth per doubling: " + ", ".join(f"{x:.2f}x" for x in growth))
    both = [T for T in Ts if mem["math", T] and mem["blockwise", T]]
    if both:
        T = both[-1]
        print(f"math / blockwise at T={T}: {mem['math', T] / mem['blockwise', T]:.1f}x")

    torch.set_num_threads(1)
    print("\n== local attention (window 256, causal), blockwise forward+backward, CPU seconds, 1 thread ==")
    local = {}
    for T in Ts:
        local[T] = best_time(lambda: _run("blockwise", T, window=256), args.repeats)
        print(f"T={T:5d}: {local[T]:.3f} s", flush=True)
    print("growth per doubling: " + ", ".join(f"{local[b] / local[a]:.2f}x" for a, b in zip(Ts, Ts[1:])))

    print("\n== causal standard attention, forward+backward, CPU seconds, 1 thread: blockwise vs SDPA ==")
    for T in Ts:
        tb = best_time(lambda: _run("blockwise", T), 1 if T >= 8192 else args.repeats)
        ts = best_time(lambda: _run("sdpa", T), args.repeats)
        print(f"T={T:5d}: blockwise {tb:.3f} s, sdpa {ts:.3f} s, blockwise/sdpa {tb / ts:.1f}x", flush=True)


if __name__ == "__main__":
    main()
