"""LoRA fine-tuning on new text: only the adapters are differentiated and optimised.

    python examples/lora_finetune.py                                 # a fresh small aam_func model
    python examples/lora_finetune.py --init-from runs/ckpt           # a checkpoint of `aam-func train`
    python examples/lora_finetune.py --hf                            # a transformers GPT-2 (built from config,
                                                                     #   or --hf-dir a local from_pretrained dir)
    options: --text FILE (default: this file) --rank 8 --alpha 16 --targets "*.attn.qkv,*.attn.out"
             --steps 40 --out DIR (PEFT adapter files: PeftModel.from_pretrained loads them)

The base params never change: ``spec.loss`` closes over them, ``train.make_train_step`` receives
the adapters as its "params", so gradients and AdamW's state cover the adapters only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import aam_func as af  # noqa: E402
from aam_func import optim, tree  # noqa: E402
from aam_func.peft import lora, save_pretrained  # noqa: E402


def byte_blocks(text: str, seq: int) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = (len(data) - 1) // seq
    return data[: n * seq].view(n, seq)


def token_blocks(text: str, tokenizer_dir: str, seq: int) -> torch.Tensor:
    from aam_func.tokenizer import Tokenizer

    ids = torch.tensor(Tokenizer.load(tokenizer_dir).encode(text), dtype=torch.long)
    n = len(ids) // seq
    if n == 0:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than one block of {seq}")
    return ids[: n * seq].view(n, seq)


def aam_base(args):
    """(model, params, blocks) from a checkpoint, or a fresh byte-level model."""
    if args.init_from:
        from aam_func.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.init_from, load_optimizer=False)
        model, params = af.Transformer(ckpt.cfg), ckpt.params
        seq = min(args.seq, ckpt.cfg.max_seq_len)
        if ckpt.tokenizer_dir:
            blocks = token_blocks(args.text_value, ckpt.tokenizer_dir, seq)
        elif ckpt.cfg.vocab_size >= 256:
            blocks = byte_blocks(args.text_value, seq)
        else:
            raise SystemExit("the checkpoint has no tokenizer/ and a vocabulary smaller than 256 bytes")
        print(f"base: checkpoint {ckpt.path} (step {ckpt.step})")
    else:
        cfg = af.ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=args.seq,
                             dropout=0.0, position_encoding="learnable", activation="gelu_tanh")
        model, params = af.Transformer(cfg), af.Transformer(cfg).init(seed=args.seed)
        blocks = byte_blocks(args.text_value, args.seq)
        print("base: a freshly initialised byte-level model (pass --init-from DIR for a checkpoint)")
    return model, params, blocks


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", help="checkpoint directory written by `aam-func train`")
    ap.add_argument("--hf", action="store_true", help="fine-tune a transformers GPT-2 instead")
    ap.add_argument("--hf-dir", help="with --hf: a local transformers model directory (from_pretrained)")
    ap.add_argument("--text", help="text file to fine-tune on (default: this file)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default=None, help="comma-separated globs (default: attention projections)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write PEFT adapter files here")
    args = ap.parse_args(argv)
    args.text_value = open(args.text or __file__, encoding="utf-8").read()
    g = torch.Generator().manual_seed(args.seed)

    if args.hf:
        return hf_main(args, g)

    from aam_func.train import make_lm_loss, make_train_step

    model, params, blocks = aam_base(args)
    spec, adapters, wrap_loss = lora.from_cli_args(params, args.rank, args.alpha, args.targets, args.seed,
                                                   dropout=args.dropout)
    print(f"LoRA r={spec.rank} alpha={spec.alpha} on {len(spec.targets)} weights: "
          f"{tree.count(adapters)} trainable of {tree.count(params)} ({100 * tree.count(adapters) / tree.count(params):.2f}%)")
    step = make_train_step(wrap_loss(make_lm_loss(model)), optim.adamw(args.lr))
    eval_loss = wrap_loss(make_lm_loss(model, train=False), train=False)
    state = step.init(adapters)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        batch = {"input_ids": blocks[torch.randint(0, len(blocks), (args.batch,), generator=g)]}
        adapters, state, metrics = step(adapters, state, batch, generator=g)
        if i == 1 or i % 10 == 0:
            print(f"step {i:3d}  loss {float(metrics['loss']):.4f}")
    final = float(eval_loss(adapters, {"input_ids": blocks[: args.batch]}))
    print(f"done in {time.perf_counter() - start:.1f}s; loss on the first blocks {final:.4f}")
    if args.out:
        try:
            save_pretrained(spec, adapters, args.out, base_model=model)
            print(f"PEFT adapter files in {args.out} (for the transformers export of this model)")
        except ValueError as e:
            print(f"not written: {e}")
    return final


def hf_main(args, g) -> float:
    """The same loop on a transformers model: ``spec.call`` under ``torch.func.grad``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.hf_dir:
        m = GPT2LMHeadModel.from_pretrained(args.hf_dir)
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=args.seq,
                                       bos_token_id=None, eos_token_id=None))
    m.requires_grad_(False).train()
    blocks = byte_blocks(args.text_value, min(args.seq, m.config.n_positions))
    targets = args.targets.split(",") if args.targets else ["c_attn"]
    spec, adapters = lora.init(m, targets=targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                               seed=args.seed)
    opt = optim.adamw(args.lr)
    state = opt.init(adapters)
    grad_fn = torch.func.grad_and_value(lambda a, ids: spec.call(m, a, ids, labels=ids).loss)
    for i in range(1, args.steps + 1):
        ids = blocks[torch.randint(0, len(blocks), (args.batch,), generator=g)]
        grads, loss = grad_fn(adapters, ids)
        updates, state = opt.update(grads, state, adapters)
        adapters = optim.apply_updates(adapters, updates)
        if i == 1 or i % 10 == 0:
            print(f"step {i:3d}  loss {float(loss):.4f}")
    m.eval()
    with torch.no_grad():
        final = float(spec.call(m, adapters, blocks[: args.batch], labels=blocks[: args.batch]).loss)
    print(f"loss on the first blocks {final:.4f}")
    if args.out:
        save_pretrained(spec, adapters, args.out, base_model=m, base_model_name_or_path=args.hf_dir)
        print(f"PEFT adapter files in {args.out}: PeftModel.from_pretrained(model, {args.out!r})")
    return final


if __name__ == "__main__":
    main()
