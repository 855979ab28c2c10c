"""One process of the multi-process tests in test_distributed.py (run as a script, with
torchrun's environment variables set by the test or by torchrun itself).

    python tests/_dist_worker.py lib OUT_DIR        # 10 float64 library steps; writes rank<r>.safetensors
    python tests/_dist_worker.py cli ARGS...        # aam_func.cli.main(ARGS), logging each checkpoint save
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)

GLOBAL_BATCH, SEQ, STEPS = 8, 12, 10


def problem():
    """A tiny float64 model, optimizer and 10 global batches whose rows carry very unequal
    padding (rows 0-3 keep 3..6 tokens, rows 4-7 all 12): rank 0's shard has far fewer predicted
    tokens than rank 1's, so only token-weighted averaging equals the global mean."""
    from aam_func import ModelConfig, Transformer, optim, tree

    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, dropout=0.0,
                      attention_dropout=0.0)
    model = Transformer(cfg)
    params = tree.cast(model.init(seed=0), torch.float64)
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
        keep = torch.tensor([3, 4, 5, 6] + [SEQ] * 4)
        mask = (torch.arange(SEQ)[None, :] < keep[:, None]).long()
        batches.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask})
    return model, params, opt, batches


def run_lib(out_dir: str) -> None:
    from safetensors.torch import save_file

    from aam_func import distributed, tree
    from aam_func.train import make_lm_loss, make_train_step

    ctx = distributed.init_from_env("cpu", timeout=60, bucket_bytes=2048)  # tiny buckets: many all_reduces
    model, params, opt, batches = problem()
    if ctx.rank != 0:  # a different start, which the broadcast must overwrite
        params = tree.map(lambda p: p + 1.0, params)
    params = ctx.broadcast_tree(params)
    step = make_train_step(make_lm_loss(model), opt, grad_reduce=ctx.grad_reduce)
    state = step.init(params)
    local = GLOBAL_BATCH // ctx.world_size
    losses = []
    for b in batches:
        shard = {k: v[ctx.rank * local:(ctx.rank + 1) * local] for k, v in b.items()}
        params, state, m = step(params, state, shard)
        losses.append(m["loss"])
    flat = tree.flatten(params)
    flat["__losses__"] = torch.stack(losses)
    flat["__tokens__"] = m["tokens"].reshape(1)
    save_file({k: v.contiguous() for k, v in flat.items()}, os.path.join(out_dir, f"rank{ctx.rank}.safetensors"))
    ctx.barrier()
    ctx.close()


def run_cli(argv: list[str]) -> int:
    import aam_func.checkpoint as checkpoint
    from aam_func import cli

    log, real = os.environ["SAVE_LOG"], checkpoint.save_checkpoint

    def logged(directory, **kw):
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('RANK', '0')} {kw['step']}\n")
        return real(directory, **kw)

    checkpoint.save_checkpoint = logged
    return cli.main(argv)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "lib":
        run_lib(sys.argv[2])
    else:
        sys.exit(run_cli(sys.argv[2:]))
