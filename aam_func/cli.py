"""``aam-func train | generate | eval`` (also ``python -m aam_func``).

    aam-func train                                   # a small GPT on Python's reference text, ~1 min on 2 cores
    aam-func generate --checkpoint runs/default --prompt "The with statement" --max-new-tokens 64 --seed 0
    aam-func eval --checkpoint runs/default [--data notes/]
    aam-func train --init-from runs/default --data notes/ --lora-rank 8 --output-dir runs/notes-lora

Bad input (a missing or empty corpus, a non-UTF-8 file, a sequence length above the model's
maximum, a tokenizer that is not available offline, a corrupted checkpoint) is one line
``error: ...`` on stderr and exit status 2, never a traceback. Ctrl-C during training saves a
checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

__all__ = ["main", "build_parser", "CLIError"]

DEFAULT_OUTPUT = os.path.join("runs", "default")
DEFAULT_PROMPT = "The "


class CLIError(ValueError):
    """A bad combination of command-line arguments."""


def _user_errors():
    from .checkpoint import CheckpointError
    from .data import DataError
    from .tokenizer import TokenizerError

    return (CLIError, DataError, TokenizerError, CheckpointError)


def _distributed_error():
    from .distributed import DistributedError

    return DistributedError


# ----------------------------------------------------------------------------- argument parsing


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _float(lo: float, hi: float = math.inf, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v > lo if lo_open else v >= lo) or not (v <= hi) or math.isnan(v):
            raise argparse.ArgumentTypeError(f"expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .config import ATTENTION_BACKENDS, ATTENTION_TYPES, POSITION_ENCODINGS

    p = argparse.ArgumentParser(prog="aam-func", description="Train, sample from and evaluate small GPTs with aam_func.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,generate,eval}")

    t = sub.add_parser("train", help="train a language model (default: a small GPT on Python's reference text)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = t.add_argument_group("data")
    d.add_argument("--data", default=None, help="a .txt/.md/.jsonl file or a folder; default: the embedded corpus (pydoc_data.topics)")
    d.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    d.add_argument("--val-fraction", type=_float(0.0, 0.9, lo_open=True), default=0.1, help="held-out share of the corpus")
    d.add_argument("--tokenizer", default=None, help="a local tokenizer directory or a cached model name; default: train a byte-level BPE on the corpus")
    d.add_argument("--vocab-size", type=_positive_int, default=4096, help="BPE vocabulary size when training a tokenizer")
    m = t.add_argument_group("model")
    m.add_argument("--d-model", type=_positive_int, default=256)
    m.add_argument("--n-layers", type=_positive_int, default=4)
    m.add_argument("--n-heads", type=_positive_int, default=8)
    m.add_argument("--d-ff", type=_positive_int, default=None, help="default: 4 * d_model")
    m.add_argument("--max-seq-len", type=_positive_int, default=None, help="the model's maximum length; default: --seq-len")
    m.add_argument("--dropout", type=_float(0.0, 0.99), default=0.0)
    m.add_argument("--attention-type", choices=ATTENTION_TYPES, default="standard")
    m.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="default: auto, except math under bf16 on CPU (torch's CPU flash-attention backward is slow in bf16)")
    m.add_argument("--position-encoding", choices=POSITION_ENCODINGS, default="learnable")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward (less memory)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--steps", type=_positive_int, default=400, help="total optimizer steps")
    o.add_argument("--batch-size", type=_positive_int, default=16)
    o.add_argument("--seq-len", type=_positive_int, default=128)
    o.add_argument("--accumulate", type=_positive_int, default=1, help="micro-batches per step (gradient accumulation)")
    o.add_argument("--lr", type=_float(0.0, lo_open=True), default=2e-3, help="peak learning rate (warmup, then cosine to lr/10)")
    o.add_argument("--warmup-steps", type=_nonneg_int, default=None, help="default: 10%% of --steps")
    o.add_argument("--weight-decay", type=_float(0.0), default=0.1)
    o.add_argument("--max-grad-norm", type=_float(0.0, lo_open=True), default=1.0)
    o.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the hardware runs it fast (CPU with AMX/AVX512-BF16, recent GPUs), else fp32")
    o.add_argument("--compile", action="store_true", help="torch.compile the train step")
    o.add_argument("--seed", type=int, default=0)
    r = t.add_argument_group("run")
    r.add_argument("--eval-every", type=_nonneg_int, default=200, help="evaluate every N steps (0: only at the end)")
    r.add_argument("--eval-batches", type=_positive_int, default=None, help="cap on validation batches per evaluation; default: all")
    r.add_argument("--save-every", type=_nonneg_int, default=0, help="checkpoint every N steps (0: at the end and on Ctrl-C)")
    r.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="run directory: checkpoint/, tokenizer/, cache/, metrics.jsonl")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: the one in --output-dir); --steps is the total")
    r.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                   help="save and stop after N steps of this invocation (split a run into pieces)")
    r.add_argument("--sample-tokens", type=_nonneg_int, default=64, help="length of the sample printed at the end (0: none)")
    r.add_argument("--log-every", type=_positive_int, default=None, help="progress line interval when not on a terminal")
    r.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--dist-timeout", type=_float(0.0, lo_open=True), default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other processes before failing")
    f = t.add_argument_group("fine-tuning")
    f.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint of aam-func train (its config, params and tokenizer; a fresh "
                        "optimizer state); without --lora-rank: full fine-tuning")
    f.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R on the frozen --init-from weights instead of all weights")
    f.add_argument("--lora-alpha", type=_float(0.0, lo_open=True), default=None, metavar="A",
                   help="LoRA scale numerator, scale = A / R (None: 2 * R)")
    f.add_argument("--lora-targets", default=None, metavar="GLOBS",
                   help="comma-separated globs or names of the adapted weights (None: " + ",".join(_LORA_DEFAULT_TARGETS) + ")")
    f.add_argument("--lora-dropout", type=_float(0.0, 0.99), default=0.0, metavar="P",
                   help="dropout on the input of the low-rank branch")

    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _checkpoint_arg(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    g.add_argument("--temperature", type=_float(0.0, lo_open=True), default=0.8)
    g.add_argument("--top-k", type=_nonneg_int, default=50, help="0: off")
    g.add_argument("--top-p", type=_float(0.0, 1.0, lo_open=True), default=0.95, help="1: off")
    g.add_argument("--repetition-penalty", type=_float(0.0, lo_open=True), default=1.0)
    g.add_argument("--device", default="cpu")

    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _checkpoint_arg(e)
    e.add_argument("--data", default=None, help="evaluate on all of this file or folder; default: the held-out split of the training corpus")
    e.add_argument("--text-field", default="text")
    e.add_argument("--seq-len", type=_positive_int, default=None, help="default: the training --seq-len")
    e.add_argument("--batch-size", type=_positive_int, default=16)
    e.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    e.add_argument("--device", default="cpu")
    return p


# model configuration flags that --init-from replaces with the checkpoint's (an error when given with it)
_SHAPE_FLAGS = ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "attention_type", "position_encoding",
                "tokenizer", "vocab_size")
_LORA_DEFAULT_TARGETS = ("*.attn.qkv", "*.attn.out")  # = aam_func.peft.lora.DEFAULT_CLI_TARGETS


def _given_flags(argv) -> set:
    """The ``train`` options that ``argv`` sets explicitly (dests), whatever their values."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for a in sub.choices["train"]._actions:
        a.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns)) - {"command"}


def _checkpoint_arg(p):
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (--output-dir of train)")


# ----------------------------------------------------------------------------- helpers


def _backend(choice: Optional[str], precision: str, device_type: str) -> str:
    """The attention backend: the user's choice, else "auto" except under bf16 on CPU, where the
    composite ("math") attention trains faster than SDPA's flash kernel (its backward is slow in bf16)."""
    if choice is not None:
        return choice
    return "math" if (precision == "bf16" and device_type == "cpu") else "auto"


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA device is available")
    return dev


def _corpus_and_split(data, text_field, val_fraction):
    from .data import load_corpus, split_documents

    docs = load_corpus(data, text_field=text_field)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if not train_docs or not val_docs:
        from .data import DataError

        raise DataError("the corpus is too small to hold out a validation part; add text")
    return train_docs, val_docs


def _write_metrics(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    from . import distributed

    device = _device(args.device)
    _, world, _ = distributed.env_world()
    if world > 1 and args.resume is None and args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the number of "
                       f"processes ({world}); use a multiple of {world}")
    dctx = distributed.init_from_env(device, timeout=args.dist_timeout) if world > 1 else None
    if dctx is None:
        return _train(args, device, None)
    import signal

    def stop(signum, frame):  # torchrun forwards Ctrl-C to its workers as SIGTERM
        dctx.stopping = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = _train(args, dctx.device, dctx)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    dctx.close()
    return code


class _PeerFailed(Exception):
    """Rank 0 failed before training (it printed why); the other ranks exit quietly with this status."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _prepare(args, device, out_dir):
    """Rank 0's part (the only part without data parallelism): resume arguments, corpus, tokenizer,
    model config, token ids. Returns (resumed checkpoint or None, tokenizer, cfg, train_ids, val_ids)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ModelConfig
    from .data import tokenize_documents
    from .tokenizer import Tokenizer

    _check_fine_tuning_args(args)
    resumed = init = None
    if args.resume is not None:
        resumed = load_checkpoint(args.resume or out_dir, load_optimizer=False)
        if resumed.train_state.get("lora"):
            raise CLIError(f"checkpoint {resumed.path} was written by a LoRA fine-tune (--lora-rank), which cannot be "
                           "resumed; its params are the merged weights: start a new run from it with --init-from")
        saved = resumed.train_state.get("args", {})
        # the run's identity comes from the checkpoint; --steps/--eval-every/--stop-after may change
        for k in ("data", "text_field", "val_fraction", "seq_len", "batch_size", "accumulate", "lr", "warmup_steps",
                  "weight_decay", "max_grad_norm", "seed", "precision"):
            if k in saved:
                setattr(args, k, saved[k])
        if args.steps <= resumed.step:
            raise CLIError(f"the checkpoint is already at step {resumed.step}; ask for more --steps than that")
    from .distributed import env_world

    world = env_world()[1]
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} (from the checkpoint) is the global batch and must be "
                       f"divisible by the number of processes ({world})")

    if args.init_from is not None:
        try:
            init = load_checkpoint(args.init_from, load_optimizer=False)
        except CheckpointError as e:
            raise CLIError(f"--init-from {args.init_from} is not a checkpoint of aam-func train: {e}") from None
        if init.tokenizer_dir is None:
            raise CLIError(f"--init-from {args.init_from}: checkpoint {init.path} holds no tokenizer/ directory")
        given = getattr(args, "_given", set())
        if "seq_len" not in given:  # default: the checkpoint's training length
            args.seq_len = min(init.train_state.get("args", {}).get("seq_len", args.seq_len), init.cfg.max_seq_len)
        if args.lora_rank is not None:  # validate rank/targets here, on rank 0, before any training work
            _lora_setup(args, init.params)

    from .train import resolve_precision

    args.precision = resolve_precision(args.precision, device)
    train_docs, val_docs = _corpus_and_split(args.data, args.text_field, args.val_fraction)

    # tokenizer: from the checkpoint, a user directory/name, or trained on the training documents
    tok_dir = os.path.join(out_dir, "tokenizer")
    t0 = time.perf_counter()
    if resumed is not None or init is not None:
        src = resumed if resumed is not None else init
        if src.tokenizer_dir is None:
            raise CLIError(f"checkpoint {src.path} holds no tokenizer/ directory")
        tok = Tokenizer.load(src.tokenizer_dir)
    elif args.tokenizer is not None:
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = Tokenizer.train_bpe(train_docs, args.vocab_size)
        print(f"trained a byte-level BPE tokenizer ({tok.vocab_size} tokens) in {time.perf_counter() - t0:.1f}s "
              f"-> {tok_dir}", flush=True)
    tok.save(tok_dir)

    # model
    if resumed is not None:
        cfg = resumed.cfg
    elif init is not None:  # the checkpoint's model; settings that leave the params' shapes alone may change
        given = getattr(args, "_given", set())
        changes = dict(learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                       mixed_precision=args.precision != "fp32")
        if "dropout" in given:
            changes.update(dropout=args.dropout, attention_dropout=0.0 if args.dropout == 0 else None)
        if "attention_backend" in given:
            changes["attention_backend"] = args.attention_backend
        if "gradient_checkpointing" in given:
            changes["gradient_checkpointing"] = args.gradient_checkpointing
        try:
            cfg = init.cfg.replace(**changes)
        except ValueError as e:
            raise CLIError(f"invalid model configuration: {e}") from None
    else:
        max_len = args.max_seq_len or args.seq_len
        try:
            cfg = ModelConfig(
                vocab_size=tok.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                d_ff=args.d_ff, max_seq_len=max_len, dropout=args.dropout, attention_dropout=0.0 if args.dropout == 0 else None,
                attention_type=args.attention_type, attention_backend=_backend(args.attention_backend, args.precision, device.type),
                position_encoding=args.position_encoding, gradient_checkpointing=args.gradient_checkpointing,
                learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                mixed_precision=args.precision != "fp32",
            )
        except ValueError as e:
            raise CLIError(f"invalid model configuration: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise CLIError(f"the tokenizer has {tok.vocab_size} tokens but the model embeds only {cfg.vocab_size}")
    if args.seq_len > cfg.max_seq_len:
        raise CLIError(f"--seq-len {args.seq_len} is above the model's maximum sequence length {cfg.max_seq_len} "
                       "(raise --max-seq-len or lower --seq-len)")

    # data: tokenize once (cached)
    cache = os.path.join(out_dir, "cache")
    train_ids = tokenize_documents(train_docs, tok, cache_dir=cache)
    val_ids = tokenize_documents(val_docs, tok, cache_dir=cache)
    return resumed, init, tok, cfg, train_ids, val_ids


def _check_fine_tuning_args(args) -> None:
    """Combinations of --init-from / --lora-* / --resume that cannot work."""
    given = getattr(args, "_given", set())
    lora_flags = [f"--{k.replace('_', '-')}" for k in ("lora_alpha", "lora_targets", "lora_dropout") if k in given]
    if args.lora_rank is None:
        if lora_flags:
            raise CLIError(f"{', '.join(lora_flags)} only apply with --lora-rank")
    else:
        if args.lora_rank <= 0:
            raise CLIError(f"--lora-rank must be a positive integer, got {args.lora_rank}")
        if args.init_from is None:
            raise CLIError("--lora-rank needs --init-from CHECKPOINT: LoRA adapts the weights of a trained model")
        if args.resume is not None:
            raise CLIError("a LoRA run (--lora-rank) cannot be resumed; start it again, or continue from its merged "
                           "weights with --init-from")
        if args.stop_after is not None:
            raise CLIError("--stop-after splits a run into resumable pieces, and a LoRA run (--lora-rank) cannot be resumed")
    if args.init_from is not None:
        if args.resume is not None:
            raise CLIError("--init-from starts a new run from a checkpoint's weights and --resume continues a run; "
                           "give one of them")
        shape = [f"--{k.replace('_', '-')}" for k in _SHAPE_FLAGS if k in given]
        if shape:
            raise CLIError(f"{', '.join(shape)} cannot be combined with --init-from: the model's configuration and "
                           "tokenizer come from the checkpoint")


def _lora_setup(args, params):
    """``lora.from_cli_args`` for the --lora-* flags; its ValueErrors (rank too large, targets that match
    nothing, with the available names) become CLIErrors."""
    from .peft import lora

    try:
        return lora.from_cli_args(params, args.lora_rank, args.lora_alpha, args.lora_targets, seed=args.seed,
                                  dropout=args.lora_dropout)
    except (TypeError, ValueError) as e:
        raise CLIError(f"LoRA: {e}") from None


def _share_preparation(args, out_dir, device, dctx):
    """Run :func:`_prepare` on rank 0 and send its results (resolved arguments, config, token ids)
    to the other ranks, or its error, so that every rank stops on bad input."""
    from .config import ModelConfig

    if dctx is None:
        return _prepare(args, device, out_dir)
    if dctx.is_main:
        try:
            resumed, init, tok, cfg, train_ids, val_ids = _prepare(args, device, out_dir)
        except BaseException as e:
            dctx.broadcast_object({"error": 130 if isinstance(e, KeyboardInterrupt) else 2})
            raise
        dctx.broadcast_object({"args": vars(args), "cfg": cfg.to_dict(), "train_ids": train_ids, "val_ids": val_ids})
        return resumed, init, tok, cfg, train_ids, val_ids
    payload = dctx.broadcast_object()
    if "error" in payload:
        raise _PeerFailed(payload["error"])
    vars(args).update(payload["args"])
    return None, None, None, ModelConfig.from_dict(payload["cfg"]), payload["train_ids"], payload["val_ids"]


def _train(args, device, dctx) -> int:
    import torch

    from . import optim
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import BlockLoader, eval_batches, pack, unigram_perplexity
    from .generate import generate
    from .model import Transformer
    from .train import dropout_generator, evaluate, make_eval_step, make_lm_loss, make_train_step

    main_rank = dctx is None or dctx.is_main
    rank, world = (0, 1) if dctx is None else (dctx.rank, dctx.world_size)

    def say(*a, **k):
        if main_rank:
            print(*a, **k, flush=True)

    out_dir = os.path.abspath(args.output_dir)
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    t_start = time.perf_counter()

    resumed, init, tok, cfg, train_ids, val_ids = _share_preparation(args, out_dir, device, dctx)
    use_lora = args.lora_rank is not None
    precision = args.precision
    model = Transformer(cfg)

    # data: pack, load (each rank its shard of the global batch)
    train_blocks = pack(train_ids, args.seq_len, what="training split").to(device)
    val_blocks = pack(val_ids, args.seq_len, what="validation split").to(device)
    rows = args.batch_size * args.accumulate
    loader = BlockLoader(train_blocks, rows, seed=args.seed, rank=rank, world_size=world)
    baseline = unigram_perplexity(train_ids, val_ids, cfg.vocab_size) if main_rank else float("nan")
    say(f"corpus: {train_ids.numel():,} training tokens, {val_ids.numel():,} held out; {len(loader)} batches "
        f"of {rows}x{args.seq_len} per epoch; unigram baseline perplexity {baseline:.1f}")

    # optimizer: AdamW (decay on matrices only), warmup + cosine to lr/10, global-norm clipping
    # (--init-from: the checkpoint's params, a fresh optimizer state; with LoRA over the adapters only)
    params = init.params if init is not None else model.init(seed=args.seed)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    warmup = min(warmup, args.steps)

    def optimizer_for(trainable):
        return optim.adamw_warmup_cosine(trainable, learning_rate=args.lr, total_steps=args.steps, warmup_steps=warmup,
                                         end_value=args.lr / 10, weight_decay=args.weight_decay,
                                         max_grad_norm=args.max_grad_norm)

    def train_step_for(loss_fn, trainable):
        return make_train_step(loss_fn, optimizer_for(trainable), accumulate=args.accumulate, precision=precision,
                               compile=args.compile, grad_reduce=None if dctx is None else dctx.grad_reduce)

    start = 0
    spec = None
    if not use_lora:
        step_fn = train_step_for(make_lm_loss(model), params)
        eval_fn = make_eval_step(make_lm_loss(model, train=False), precision=precision)
        opt_state = step_fn.init(params)
    if resumed is not None:
        full = load_checkpoint(resumed.path, opt_template=opt_state)
        params, opt_state, start = full.params, full.opt_state, full.step
        if "torch" in full.rng:
            torch.set_rng_state(full.rng["torch"])
        say(f"resumed from {full.path} at step {start}")
    else:
        torch.manual_seed(args.seed)
    params = {k: v for k, v in _to_device(params, device).items()}
    if dctx is not None:  # every rank starts from rank 0's params, optimizer state and step
        params = dctx.broadcast_tree(params)
        start = dctx.broadcast_object(start)
    if use_lora:
        # frozen base params (the very tensors the loss sees: LoRA finds its targets by identity), adapters trained
        spec, adapters, wrap_loss = _lora_setup(args, params)
        adapters = _to_device(adapters, device)
        if dctx is not None:
            adapters = dctx.broadcast_tree(adapters, what="broadcast of the LoRA adapters from rank 0")
        step_fn = train_step_for(wrap_loss(make_lm_loss(model)), adapters)
        eval_fn = make_eval_step(wrap_loss(make_lm_loss(model, train=False), train=False), precision=precision)
        opt_state = step_fn.init(adapters)
        trainable = adapters
    else:
        trainable = params
    opt_state = _to_device(opt_state, device)
    if dctx is not None:
        opt_state = dctx.broadcast_tree(opt_state, what="broadcast of the optimizer state from rank 0")
    n_params = sum(v.numel() for v in _leaves(params))
    say(f"model: {n_params / 1e6:.2f}M parameters ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"vocab {cfg.vocab_size}, {cfg.position_encoding} positions, {cfg.attention_backend} attention); precision {precision}"
        f"{', compiled' if args.compile else ''}; {args.steps} steps"
        + ("" if dctx is None else f"; data parallel over {world} processes ({dctx.backend}), "
           f"{rows // world} rows each"))
    if args.init_from is not None:
        say(f"initialised from {init.path if init is not None else args.init_from} "
            f"({'LoRA on frozen weights' if use_lora else 'full fine-tuning'}, fresh optimizer state)")
    n_train = sum(v.numel() for v in _leaves(trainable))
    if use_lora:
        say(f"trainable: {n_train:,} LoRA parameters of {n_params + n_train:,} in all ({100 * n_train / (n_params + n_train):.2f}%); "
            f"rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g}, "
            f"{len(spec.targets)} target(s): {', '.join(spec.names)}")
    else:
        say(f"trainable: {n_train:,} parameters (all)")

    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    saved_args = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "_given")}
    saved_args["precision"] = precision
    last: dict = {"baseline_perplexity": baseline}
    adapter_dir = os.path.join(out_dir, "adapter")
    extra_state = {}
    if spec is not None:
        extra_state["lora"] = {"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout,
                               "targets": list(spec.names), "adapter_dir": adapter_dir}
    if args.init_from is not None:
        extra_state["init_from"] = init.path if init is not None else args.init_from
    elif resumed is not None and resumed.train_state.get("init_from"):  # a resumed full fine-tune keeps its origin
        extra_state["init_from"] = resumed.train_state["init_from"]

    def weights():
        """The model's params: with LoRA the merged W + s·B·A, else the trained params."""
        return spec.merged(params, trainable) if spec is not None else trainable

    def save(step: int, sync: bool = True) -> None:
        """Rank 0 writes; with ``sync`` the others wait for it (a barrier). A LoRA run writes the merged
        weights (an ordinary checkpoint, without optimizer state) and the adapters in ``adapter/``."""
        if main_rank:
            save_checkpoint(
                ckpt_dir, cfg=cfg, params=weights(), opt_state=None if spec is not None else opt_state, step=step,
                rng={"torch": torch.get_rng_state()}, tokenizer=tok,
                train_state={"args": saved_args, "metrics": last, "seed": args.seed, **extra_state},
            )
            if spec is not None:
                _save_adapters(spec, trainable, adapter_dir, model, announce=not adapter_note)
                adapter_note.append(True)
        if dctx is not None and sync:
            dctx.barrier("barrier after writing the checkpoint")

    adapter_note: list = []

    def run_eval():
        batches = eval_batches(val_blocks, args.batch_size, args.eval_batches)
        return evaluate(eval_fn, trainable, batches) if dctx is None else dctx.evaluate(eval_fn, trainable, batches)

    if args.init_from is not None and start == 0:  # where fine-tuning starts from
        ev = run_eval()
        last.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
        say(f"step 0: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} (the --init-from weights)")
        if main_rank:
            _write_metrics(metrics_path, {"step": 0, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"]})

    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    use_bar = sys.stderr.isatty() and main_rank
    log_every = args.log_every or max(1, (end - start) // 10)
    from tqdm import tqdm

    bar = tqdm(total=end - start, initial=0, desc="train", unit="step", dynamic_ncols=True, disable=not use_bar)
    step = start
    window_tokens, window_start = 0, time.perf_counter()
    tok_per_s = 0.0
    try:
        while step < end:
            batch = loader.batch(step)
            gen = None
            if cfg.dropout > 0 or cfg.attention_dropout > 0:  # per step (resumable) and per rank (independent masks)
                gen = dropout_generator(args.seed, step, device, rank)
            trainable, opt_state, m = (step_fn(trainable, opt_state, batch, gen) if gen is not None
                                       else step_fn(trainable, opt_state, batch))
            step += 1
            window_tokens += int(m["tokens"])
            log_now = not use_bar and (step % log_every == 0 or step == end)
            if step % 10 == 0 or step == end or step - start <= 1 or log_now:
                loss = float(m["loss"])  # the global loss: the same on every rank
                if not math.isfinite(loss):
                    raise CLIError(f"the loss became {loss} at step {step}; lower --lr or use --precision fp32")
                now = time.perf_counter()
                tok_per_s = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                last.update(step=step, loss=loss, learning_rate=float(m["learning_rate"]), grad_norm=float(m["grad_norm"]))
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{last['learning_rate']:.2e}", tok_s=f"{tok_per_s:,.0f}")
                if main_rank:
                    _write_metrics(metrics_path, {"step": step, "loss": loss, "learning_rate": last["learning_rate"],
                                                  "grad_norm": last["grad_norm"], "tokens_per_s": tok_per_s})
            bar.update(1)
            if log_now:
                say(f"step {step}/{args.steps}  loss {last.get('loss', float('nan')):.4f}  "
                    f"lr {last.get('learning_rate', 0):.2e}  {tok_per_s:,.0f} tok/s")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                ev = run_eval()
                last.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
                if main_rank:
                    bar.write(f"step {step}: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} "
                              f"(unigram baseline {baseline:.1f})")
                    sys.stdout.flush()
                    _write_metrics(metrics_path, {"step": step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"]})
            if args.save_every and step % args.save_every == 0 and step < end:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        if dctx is not None:
            dctx.stopping = True
        # rank 0 alone saves (its params are the replicated state after `step` steps); no
        # collective here: the other ranks are stopping too, or are gone
        save(step, sync=False)
        if main_rank and spec is not None:
            print(f"\ninterrupted at step {step}: merged weights saved to {ckpt_dir}, adapters to {adapter_dir} "
                  f"(a LoRA run cannot be resumed; fine-tune further with --init-from {ckpt_dir})",
                  file=sys.stderr, flush=True)
        elif main_rank:
            launch = "aam-func" if dctx is None else f"torchrun --nproc-per-node {world} -m aam_func"
            print(f"\ninterrupted at step {step}: checkpoint saved to {ckpt_dir} "
                  f"(continue with: {launch} train --output-dir {args.output_dir} --resume --steps {args.steps})",
                  file=sys.stderr, flush=True)
        return 130
    bar.close()

    ev = run_eval()
    last.update(step=step, val_loss=ev["loss"], val_perplexity=ev["perplexity"])
    if main_rank:
        _write_metrics(metrics_path, {"step": step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"]})
    save(step)
    elapsed = time.perf_counter() - t_start
    say(f"step {step}: held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} "
        f"(unigram baseline {baseline:.1f}); {elapsed:.0f}s in all")
    say(f"checkpoint: {ckpt_dir}" + (" (merged LoRA weights)" if spec is not None else ""))
    if main_rank and args.sample_tokens and step >= args.steps:
        n = min(args.sample_tokens, cfg.max_seq_len - 2)
        prompt = tok(DEFAULT_PROMPT)
        ids = generate(model, weights(), prompt["input_ids"].to(device), max_new_tokens=n, do_sample=True,
                       temperature=0.8, top_k=50, top_p=0.95, seed=args.seed, eos_token_id=tok.eos_token_id)
        print("sample:\n" + tok.decode(ids[0]), flush=True)
    return 0


def _save_adapters(spec, adapters, directory, model, announce: bool) -> None:
    """The adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) when the
    model has a transformers equivalent; otherwise ``adapters.safetensors`` (an aam_func tree) and
    ``lora.json`` (rank, alpha, dropout, targets)."""
    from . import tree
    from .peft import save_pretrained

    try:
        save_pretrained(spec, adapters, directory, base_model=model)
        if announce:
            print(f"adapters (PEFT format): {directory}", flush=True)
        return
    except ValueError as e:
        reason = str(e)
    os.makedirs(directory, exist_ok=True)
    tree.save(adapters, os.path.join(directory, "adapters.safetensors"), {"format": "aam_func.lora"})
    with open(os.path.join(directory, "lora.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "use_rslora": spec.use_rslora,
                   "targets": list(spec.names)}, f, indent=2)
    if announce:
        print(f"adapters: {os.path.join(directory, 'adapters.safetensors')} (aam_func tree, not PEFT files: {reason})",
              flush=True)


def _to_device(tree_, device):
    from . import tree

    return tree.map(lambda x: x.to(device), tree_) if tree_ else tree_


def _leaves(tree_):
    from . import tree

    return tree.leaves(tree_)


# ----------------------------------------------------------------------------- generate / eval


def _load_for_inference(path: str, device):
    from .checkpoint import CheckpointError, load_checkpoint
    from .model import Transformer
    from .tokenizer import Tokenizer

    ckpt = load_checkpoint(path, load_optimizer=False)
    if ckpt.tokenizer_dir is None:
        raise CheckpointError(f"checkpoint {ckpt.path} holds no tokenizer/ directory")
    tok = Tokenizer.load(ckpt.tokenizer_dir)
    params = _to_device(ckpt.params, device)
    return ckpt, Transformer(ckpt.cfg), params, tok


def cmd_generate(args) -> int:
    from .generate import generate, left_pad

    device = _device(args.device)
    ckpt, model, params, tok = _load_for_inference(args.checkpoint, device)
    prompts = [tok.encode(p) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        raise CLIError("a --prompt is empty; give some text to continue")
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > ckpt.cfg.max_seq_len:
        raise CLIError(f"prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                       f"maximum sequence length {ckpt.cfg.max_seq_len}")
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = generate(
        model, params, ids.to(device), attention_mask=mask.to(device), max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        seed=args.seed,
    )
    for i, row in enumerate(out):
        text = tok.decode(row[ids.shape[1] - len(prompts[i]):])
        if len(args.prompt) > 1:
            print(f"--- {i}")
        print(text, flush=True)
    return 0


def cmd_eval(args) -> int:
    from .data import eval_batches, load_corpus, pack, tokenize_documents
    from .train import evaluate, make_eval_step, make_lm_loss, resolve_precision

    device = _device(args.device)
    ckpt, model, params, tok = _load_for_inference(args.checkpoint, device)
    saved = ckpt.train_state.get("args", {})
    seq_len = args.seq_len or saved.get("seq_len") or ckpt.cfg.max_seq_len
    if seq_len > ckpt.cfg.max_seq_len:
        raise CLIError(f"--seq-len {seq_len} is above the model's maximum sequence length {ckpt.cfg.max_seq_len}")
    if args.data is not None:
        docs, what = load_corpus(args.data, text_field=args.text_field), args.data
    else:
        _, docs = _corpus_and_split(saved.get("data"), saved.get("text_field", "text"), saved.get("val_fraction", 0.1))
        what = "the held-out split of " + (saved.get("data") or "the embedded corpus")
    ids = tokenize_documents(docs, tok)
    blocks = pack(ids, seq_len, what="evaluation data").to(device)
    precision = resolve_precision(args.precision, device)
    ev = evaluate(make_eval_step(make_lm_loss(model, train=False), precision=precision), params,
                  eval_batches(blocks, args.batch_size))
    print(f"data: {what} ({ev['tokens']:,} predicted tokens, {blocks.shape[0]} blocks of {seq_len})")
    print(f"loss {ev['loss']:.4f}")
    print(f"perplexity {ev['perplexity']:.2f}")
    return 0


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        args._given = _given_flags(sys.argv[1:] if argv is None else argv)
    handlers = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval}
    try:
        return handlers[args.command](args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _PeerFailed as e:
        return e.code
    except _distributed_error() as e:
        # a broken process group can abort the interpreter at exit (gloo's destructor calls
        # std::terminate on a dead peer's pair): report and leave now, with a plain status 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
