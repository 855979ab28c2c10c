"""Benchmark: one training step of the default model with and without document masking (issue 20).

Run:  python benchmarks/document_mask_step.py              (both precisions, 8 rounds)
      python benchmarks/document_mask_step.py --rounds 3   (quicker)

Model: the default run's (4 layers, d_model 256, 8 heads, vocab 4096, learnable positions),
batch 16 x 128, ``torch.func.grad_and_value`` of the train loss (``train.make_lm_loss``). Two
settings: bf16 autocast with the math attention backend (what ``aam-func train`` runs on a CPU
with native bf16, the default) and fp32 with ``auto`` (what it runs elsewhere). The batch holds
2 document boundaries in 16 rows (the default corpus has about 1 in 11 blocks).

Time: CPU seconds on one thread (``time.process_time``: the machine is shared, wall time is
not reliable), masked and unmasked steps interleaved in the same process, after a warm-up;
best and median of ``--rounds``. The ratio masked / unmasked is what to read.
Uses only the public API, so it runs unchanged on older commits for a before/after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import aam_func as af  # noqa: E402
from aam_func.train import autocast, make_lm_loss  # noqa: E402

EOS = 3


def _step(document_mask: bool, precision: str, ids):
    cfg = af.ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, max_seq_len=128, dropout=0.0,
                         attention_dropout=0.0, position_encoding="learnable", mixed_precision=precision != "fp32",
                         attention_backend="math" if precision == "bf16" else "auto",
                         **({"document_mask": True, "eos_token_id": EOS} if document_mask else {}))
    model = af.Transformer(cfg)
    params, loss = model.init(seed=0), make_lm_loss(model)

    def step():
        with autocast(precision, "cpu"):
            return torch.func.grad_and_value(lambda p: loss(p, {"input_ids": ids}))(params)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(EOS + 1, 4096, (16, 128), generator=g)
    ids[3, 50] = ids[9, 100] = EOS
    for precision in ("bf16", "fp32"):
        steps = {dm: _step(dm, precision, ids) for dm in (False, True)}
        times = {dm: [] for dm in steps}
        for s in steps.values():
            s()
        for _ in range(args.rounds):
            for dm, s in steps.items():
                t = time.process_time()
                s()
                times[dm].append(time.process_time() - t)
        best = {dm: min(v) for dm, v in times.items()}
        med = {dm: statistics.median(v) for dm, v in times.items()}
        print(f"{precision}: unmasked best {best[False] * 1e3:.0f} ms (median {med[False] * 1e3:.0f}), "
              f"document-masked best {best[True] * 1e3:.0f} ms (median {med[True] * 1e3:.0f}); "
              f"ratio best {best[True] / best[False]:.2f}, median {med[True] / med[False]:.2f}", flush=True)


if __name__ == "__main__":
    main()
