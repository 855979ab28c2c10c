"""Writing a run's checkpoint (rank 0) and, for a LoRA run, its adapters."""

from __future__ import annotations

import json
import os

import torch

from .. import checkpoint, optim, tree
from ..peft import save_pretrained
from .state import Run

__all__ = ["save_run", "save_adapters"]


def save_run(run: Run, step: int, trainable: dict, opt_state: dict, metrics: dict, *, sync: bool = True,
             announce_adapters: bool = False) -> None:
    """Rank 0 writes ``<output_dir>/checkpoint``; with ``sync`` the other ranks wait for it (a
    barrier). A LoRA run writes the merged weights (an ordinary checkpoint, without optimizer
    state) and the adapters in ``adapter/`` (announced when ``announce_adapters``)."""
    cfg, spec = run.config, run.lora
    if run.is_main:
        extra = {}
        if spec is not None:
            extra["lora"] = {"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout,
                             "targets": list(spec.names), "adapter_dir": run.adapter_dir}
        if run.init_path:
            extra["init_from"] = run.init_path
        if run.dp is not None:  # the accountant's history: --resume continues it, or refuses a spent budget
            extra["dp"] = run.dp.saved(step)
        # looked up on the module at call time: tests wrap checkpoint.save_checkpoint to log saves
        # an averaging optimizer (--ema, schedule-free): the params saved are the averaged ones, the
        # trained ones go beside the optimizer state ("train_params") for --resume
        shown = optim.eval_params(opt_state, trainable) if opt_state is not None else trainable
        if shown is not trainable and spec is None:
            opt_state = {**opt_state, "train_params": trainable}
        checkpoint.save_checkpoint(
            run.checkpoint_dir, cfg=run.model_config, params=run.weights(shown),
            opt_state=None if spec is not None else opt_state, step=step, rng={"torch": torch.get_rng_state()},
            tokenizer=run.tokenizer,
            train_state={"args": cfg.saved_args(), "metrics": metrics, "seed": cfg.seed, **extra},
            keep=cfg.keep_checkpoints,
        )
        if spec is not None:
            save_adapters(spec, trainable, run.adapter_dir, run.model, log=run.log if announce_adapters else None)
    if run.dist is not None and sync:
        run.dist.barrier("barrier after writing the checkpoint")


def save_adapters(spec, adapters, directory: str, model, *, log=None) -> None:
    """The adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) when the
    model has a transformers equivalent; otherwise ``adapters.safetensors`` (an aam_func tree) and
    ``lora.json`` (rank, alpha, dropout, targets). ``log`` (if given) hears where they went."""
    try:
        save_pretrained(spec, adapters, directory, base_model=model)
        if log is not None:
            log(f"adapters (PEFT format): {directory}")
        return
    except ValueError as e:
        reason = str(e)
    os.makedirs(directory, exist_ok=True)
    tree.save(adapters, os.path.join(directory, "adapters.safetensors"), {"format": "aam_func.lora"})
    with open(os.path.join(directory, "lora.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "use_rslora": spec.use_rslora,
                   "targets": list(spec.names)}, f, indent=2)
    if log is not None:
        log(f"adapters: {os.path.join(directory, 'adapters.safetensors')} (aam_func tree, not PEFT files: {reason})")
