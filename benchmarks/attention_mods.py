"""Benchmark: document masking skips tiles (issue 20). Blockwise attention with a document mask
(16 documents of 512 tokens at T = 8192) against full causal blockwise attention, same process.

Run:  python benchmarks/attention_mods.py            (T = 8192; a few minutes on a loaded 2-core machine)
      python benchmarks/attention_mods.py --quick    (T = 2048, 4 documents of 512)

Shape: batch 1, 4 heads, head_dim 64, float32, causal, tiles 128 x 128.

Time: CPU seconds of forward + backward on one thread (``time.process_time``: the machine is
shared, wall time is not reliable), best of ``--repeats`` after a warm-up. The document mask is
a :class:`~aam_func.ops.attention.BlockMask` built once (its build time is reported apart: a
model builds it once per batch for all layers). Target: document / causal <= 1/8.

Memory: each T in a fresh process (``_memory.py``): peak resident memory of the
document-masked forward + backward above the resident memory before it; O(T) means ~2x per
doubling of T (a dense (T, T) score matrix would be 4x: 256 MiB per head at T = 8192).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _memory import peak, reset_peak, rss_now  # noqa: E402

from aam_func.ops.attention import attention, create_block_mask, mods  # noqa: E402

H, D, DOC = 4, 64, 512


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, T, D, generator=g).requires_grad_() for _ in range(3)]


def _doc_mask(T):
    doc = torch.arange(T).div(DOC, rounding_mode="floor")[None]  # T / 512 documents
    return create_block_mask(mods.document(doc), 1, 1, T, T)


def _run(T, block_mask=None, inputs=None):
    q, k, v = inputs or _inputs(T)
    out = attention(q, k, v, causal=True, backend="blockwise", block_mask=block_mask)
    out.backward(torch.ones_like(out))


def best_time(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def child(T):
    torch.set_num_threads(1)
    _run(256, _doc_mask(256))  # warm up outside the measurement
    bm = _doc_mask(T)
    q, k, v = _inputs(T)
    before = rss_now()
    reset_peak()
    out = attention(q, k, v, causal=True, backend="blockwise", block_mask=bm)
    out.backward(torch.ones_like(out))
    print(json.dumps({"T": T, "peak_extra_mib": (peak() - before) / 2**20}))


def measure_memory(T):
    r = subprocess.run([sys.executable, __file__, "--child", str(T)], capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_extra_mib"] if r.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    T = 2048 if args.quick else 8192
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, batch 1, heads {H}, head_dim {D}, float32, causal, "
          f"{T // DOC} documents of {DOC} at T={T}\n")
    t = time.process_time()
    bm = _doc_mask(T)
    build = time.process_time() - t
    print(f"block mask: {bm!r}, built in {build:.3f} CPU s")
    x = _inputs(T)  # drawn once, outside the timings
    td = best_time(lambda: _run(T, bm, x), args.repeats)
    tc = best_time(lambda: _run(T, None, x), args.repeats)
    print(f"forward+backward: document mask {td:.3f} s, full causal {tc:.3f} s, document / causal = "
          f"{td / tc:.3f} (1/{tc / td:.1f}); with the block-mask build: {(td + build) / tc:.3f}")

    print("\npeak extra memory of the document-masked forward+backward (fresh process per T):")
    Ts = [T // 4, T // 2, T]
    mem = {n: measure_memory(n) for n in Ts}
    for n in Ts:
        print(f"T={n:5d}: " + ("failed" if mem[n] is None else f"{mem[n]:8.1f} MiB"))
    growth = [mem[b] / mem[a] for a, b in zip(Ts, Ts[1:]) if mem[a] and mem[b]]
    print("growth per doubling: " + ", ".join(f"{x:.2f}x" for x in growth))


if __name__ == "__main__":
    main()
