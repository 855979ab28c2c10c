"""The prepared run: model, data loader, train and eval steps, the params (and LoRA adapters) and
the optimizer state at the starting step, on every rank alike (rank 0's, broadcast)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import optim, tree
from ..checkpoint import load_checkpoint
from ..data import DEFAULT_EVAL_BATCHES, training_data
from ..model import Transformer
from ..peft import lora as peft_lora
from ..train import make_eval_step, make_lm_loss, make_train_step, needs_dropout_generator
from .config import RunConfig, RunError
from .output import Log
from .privacy import make_dp_train_step, setup_dp

__all__ = ["Run", "build_run", "setup_lora"]


@dataclass(frozen=True)
class Run:
    """Everything :func:`aam_func.run.loop` needs, as prepared by :func:`aam_func.run.prepare`.

    ``trainable`` is what the optimizer updates: the params, or with LoRA the adapters over the
    frozen ``params``. ``start`` is the first step to take (the resumed checkpoint's step, else 0).
    ``init_path`` is the --init-from checkpoint the run started from (kept when a fine-tune is
    resumed). ``tokenizer``, ``init_path`` and the unigram ``baseline`` are rank 0's (None / NaN
    elsewhere)."""

    config: RunConfig
    model_config: Any
    model: Any
    device: torch.device
    dist: Any
    log: Log
    tokenizer: Any
    loader: Any
    val_blocks: torch.Tensor
    baseline: float
    train_step: Callable
    eval_step: Callable
    params: dict
    trainable: dict
    opt_state: dict
    lora: Any
    start: int
    init_path: Optional[str]
    t_start: float
    dp: Any = None  # the privacy state of a --dp-epsilon run (aam_func.run.privacy.DPState), else None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def rank(self) -> int:
        return 0 if self.dist is None else self.dist.rank

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def output_dir(self) -> str:
        return os.path.abspath(self.config.output_dir)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoint")

    @property
    def adapter_dir(self) -> Optional[str]:
        """Where a LoRA run writes its adapters (None without LoRA)."""
        return None if self.lora is None else os.path.join(self.output_dir, "adapter")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.output_dir, "metrics.jsonl")

    @property
    def needs_dropout_generator(self) -> bool:
        """Whether a step draws dropout masks (the model's or LoRA's): it then gets a generator per
        step and rank (:func:`aam_func.train.needs_dropout_generator`)."""
        return needs_dropout_generator(self.model_config, self.lora.dropout if self.lora is not None else 0.0)

    def weights(self, trainable: dict) -> dict:
        """The model's params for ``trainable``: with LoRA the merged W + s·B·A, else ``trainable``."""
        return self.lora.merged(self.params, trainable) if self.lora is not None else trainable


def build_run(prepared, sources, device, dctx, say: Log, t_start: float) -> Run:
    """Every rank: pack and shard the data, then the params, optimizer and steps (:func:`_state`)."""
    cfg, mcfg = prepared.config, prepared.model_config
    rank, world = (0, 1) if dctx is None else (dctx.rank, dctx.world_size)
    model = Transformer(mcfg)
    rows = cfg.batch_size * cfg.accumulate
    main = dctx is None or dctx.is_main
    data = training_data(prepared.data_dir, seq_len=cfg.seq_len, batch_rows=rows, seed=cfg.seed, rank=rank,
                         world_size=world, device=device, checksum=cfg.data_checksum,
                         eval_rows=(cfg.eval_batches or DEFAULT_EVAL_BATCHES) * cfg.batch_size)
    loader, val_blocks = data.loader, data.val_blocks
    dp, loader = setup_dp(cfg, loader, sources.resumed, say, dctx, mcfg)  # a Poisson loader for a private run
    baseline = data.baseline if main else float("nan")
    say(f"corpus: {data.train_tokens:,} training tokens, {data.val_tokens:,} held out ({prepared.data_dir}); "
        f"{len(loader)} batches of {rows}x{cfg.seq_len} per epoch; unigram baseline perplexity {baseline:.1f}")
    state = _state(cfg, model, sources, device, dctx, say, dp)
    init_path = None  # rank 0's: the --init-from checkpoint, which a resumed full fine-tune keeps as its origin
    if cfg.init_from is not None:
        init_path = sources.init.path if sources.init is not None else cfg.init_from
    elif sources.resumed is not None:
        init_path = sources.resumed.train_state.get("init_from")
    run = Run(config=cfg, model_config=mcfg, model=model, device=device, dist=dctx, log=say,
              tokenizer=sources.tokenizer, loader=loader, val_blocks=val_blocks, baseline=baseline,
              init_path=init_path, t_start=t_start, dp=dp, **state)
    _describe(run)
    return run


def _state(cfg: RunConfig, model, sources, device, dctx, say: Log, dp=None) -> dict:
    """Params, optimizer state, train/eval steps and the start step. --init-from: the checkpoint's
    params and a fresh optimizer state, with LoRA over the adapters only; --resume: the
    checkpoint's params, optimizer state, step and torch RNG state."""
    params = sources.init.params if sources.init is not None else model.init(seed=cfg.seed)
    start, spec, opt_state = 0, None, None
    if cfg.lora_rank is None:
        train_step = _train_step(cfg, make_lm_loss(model), params, dctx, dp)
        eval_step = make_eval_step(make_lm_loss(model, train=False), precision=cfg.precision)
        opt_state = train_step.init(params)
    if sources.resumed is not None:
        # an averaging optimizer's checkpoint holds the averaged params, the trained ones beside its state
        averaging = optim.has_average(opt_state)
        template = {**opt_state, "train_params": params} if averaging else opt_state
        full = load_checkpoint(sources.resumed.path, opt_template=template)
        params, opt_state, start = full.params, full.opt_state, full.step
        if averaging:
            opt_state = dict(opt_state)
            params = opt_state.pop("train_params")
        if "torch" in full.rng:
            torch.set_rng_state(full.rng["torch"])
        say(f"resumed from {full.path} at step {start}")
    else:
        torch.manual_seed(cfg.seed)
    params = tree.to(params, device)
    if dctx is not None:  # every rank starts from rank 0's params, optimizer state and step
        params = dctx.broadcast_tree(params)
        start = dctx.broadcast_object(start)
    trainable = params
    if cfg.lora_rank is not None:
        # frozen base params (the very tensors the loss sees: LoRA finds its targets by identity), adapters trained
        spec, adapters, wrap_loss = setup_lora(cfg, params)
        trainable = tree.to(adapters, device)
        if dctx is not None:
            trainable = dctx.broadcast_tree(trainable, what="broadcast of the LoRA adapters from rank 0")
        train_step = _train_step(cfg, wrap_loss(make_lm_loss(model)), trainable, dctx, dp)
        eval_step = make_eval_step(wrap_loss(make_lm_loss(model, train=False), train=False), precision=cfg.precision)
        opt_state = train_step.init(trainable)
    opt_state = tree.to(opt_state, device)
    if dctx is not None:
        opt_state = dctx.broadcast_tree(opt_state, what="broadcast of the optimizer state from rank 0")
    return dict(params=params, trainable=trainable, opt_state=opt_state, train_step=train_step, eval_step=eval_step,
                lora=spec, start=start)


def setup_lora(cfg: RunConfig, params) -> tuple:
    """``lora.from_cli_args`` for the lora_* settings: ``(spec, adapters, wrap_loss)``; its errors
    (rank too large, targets that match nothing, with the available names) become RunErrors."""
    try:
        return peft_lora.from_cli_args(params, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed,
                                  dropout=cfg.lora_dropout)
    except (TypeError, ValueError) as e:
        raise RunError(f"LoRA: {e}") from None


def run_optimizer(cfg: RunConfig, trainable):
    """The run's optimizer over ``trainable`` (:func:`aam_func.optim.run_optimizer`): the
    --optimizer (default AdamW, decay on matrices only), warmup + cosine to lr/10, global-norm
    clipping, --ema averaging."""
    return optim.run_optimizer(trainable, optimizer=cfg.optimizer, learning_rate=cfg.lr, total_steps=cfg.steps,
                               warmup_steps=cfg.warmup, end_value=cfg.lr / 10, weight_decay=cfg.weight_decay,
                               max_grad_norm=cfg.max_grad_norm, ema=cfg.ema, muon_learning_rate=cfg.muon_lr,
                               muon_momentum=cfg.muon_momentum)


def _train_step(cfg: RunConfig, loss_fn: Callable, trainable, dctx, dp=None) -> Callable:
    """The run's optimizer (:func:`run_optimizer`) over ``trainable``; with ``dp`` around the
    DP-SGD gradient (:mod:`aam_func.run.privacy`)."""
    opt = run_optimizer(cfg, trainable)
    if dp is not None:
        return make_dp_train_step(cfg, loss_fn, trainable, dctx, dp, opt)
    return make_train_step(loss_fn, opt, accumulate=cfg.accumulate, precision=cfg.precision, compile=cfg.compile,
                           grad_reduce=None if dctx is None else dctx.grad_reduce)


def _describe(run: Run) -> None:
    """The model, precision, parallelism and trainable-parameter lines."""
    cfg, mcfg, spec = run.config, run.model_config, run.lora
    n_params = tree.count(run.params)
    rows = cfg.batch_size * cfg.accumulate
    run.log(f"model: {n_params / 1e6:.2f}M parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, "
            f"{mcfg.n_heads} heads, vocab {mcfg.vocab_size}, {mcfg.position_encoding} positions, "
            f"{mcfg.attention_backend} attention); precision {cfg.precision}{', compiled' if cfg.compile else ''}; "
            f"{cfg.steps} steps" + ("" if run.dist is None else f"; data parallel over {run.world_size} processes "
                                    f"({run.dist.backend}), {rows // run.world_size} rows each"))
    if cfg.init_from is not None:
        run.log(f"initialised from {run.init_path} "
                f"({'LoRA on frozen weights' if spec is not None else 'full fine-tuning'}, fresh optimizer state)")
    n_train = tree.count(run.trainable)
    if spec is not None:
        total = n_params + n_train
        run.log(f"trainable: {n_train:,} LoRA parameters of {total:,} in all ({100 * n_train / total:.2f}%); "
                f"rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g}, "
                f"{len(spec.targets)} target(s): {', '.join(spec.names)}")
    else:
        run.log(f"trainable: {n_train:,} parameters (all)")
