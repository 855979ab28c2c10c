"""Bring your own model: adamw and per-example gradient norms on a transformers BERT.

A BERT-shaped classifier is built from a tiny config (nothing is downloaded) and turned into a
pure function with ``af.nn.functionalize``: its parameters are the flat ``named_parameters()``
dict (``"bert.encoder.layer.0.attention.self.query.weight"`` ...), exactly what
``torch.func.functional_call`` takes. aam_func's optimizer updates that dict as it is, and
``af.per_sample.norms`` gives every example's gradient norm (what DP-SGD clips), here next to
the loss of each step.

    python examples/any_module.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aam_func as af  # noqa: E402
from aam_func import optim  # noqa: E402


def build_model(seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()  # eval: no dropout, so each example's loss is a pure function


def make_data(n: int, seq: int, seed: int):
    """A toy task: label 1 when token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, seq), generator=g)
    label = torch.rand(n, generator=g) < 0.5
    pos = torch.randint(1, seq, (n,), generator=g)
    ids[label, pos[label]] = 7
    return {"input_ids": ids, "labels": label.long()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    apply, params, buffers = af.nn.functionalize(build_model(args.seed))
    print(f"{len(params)} parameter tensors, e.g. {next(iter(params))!r}; {af.tree.count(params):,} numbers")

    def loss_fn(p, batch):
        out, _ = apply(p, buffers, input_ids=batch["input_ids"])
        return F.cross_entropy(out.logits, batch["labels"])

    opt = optim.adamw(args.lr, weight_decay=0.01, mask=optim.decay_rule)  # no decay on biases and LayerNorms
    state = opt.init(params)
    data = make_data(args.batch_size * args.steps, args.seq, args.seed)
    for step in range(args.steps):
        batch = {k: v[step * args.batch_size:(step + 1) * args.batch_size] for k, v in data.items()}
        loss, grads = torch.func.grad_and_value(loss_fn)(params, batch)[::-1]
        norms = af.per_sample.norms(loss_fn, params, batch)  # (B,) per-example gradient norms
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)  # still the flat named_parameters() dict
        print(f"step {step:3d}  loss {float(loss):.4f}  per-example grad norm: median {float(norms.median()):.4f} "
              f"max {float(norms.max()):.4f}")


if __name__ == "__main__":
    main()
