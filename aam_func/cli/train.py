"""``aam-func train``: its flags (one per :class:`aam_func.run.RunConfig` field, with the field's
default) and the command, which builds the config and hands it to :func:`aam_func.run.train`."""

from __future__ import annotations

import argparse
import sys

from ..config import ATTENTION_BACKENDS, ATTENTION_TYPES, POSITION_ENCODINGS
from ..data import DEFAULT_EVAL_BATCHES
from ..optim.recipes import RUN_OPTIMIZERS
from ..peft.lora import DEFAULT_CLI_TARGETS
from ..run.config import PRECISION_FLAG_CHOICES, RunConfig
from ..run.output import LOG_TO_CHOICES
from ..run.signals import exit_status, ignoring_stop_signals
from ..run.config import default as field_default
from .args import field_type

__all__ = ["add_parser", "add_arguments", "given_flags", "cmd_train"]


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a language model (default: a small GPT on Python's reference text)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(t)
    return t


def add_arguments(t: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The train flags on ``t``; ``defaults=False`` leaves every default out (argparse.SUPPRESS),
    so that a parse holds only the flags given (:func:`given_flags`)."""
    default = field_default if defaults else (lambda name: argparse.SUPPRESS)
    _data_and_model(t, default)
    _optimisation(t, default)
    _run(t, default)
    _fine_tuning(t, default)
    _privacy(t, default)


def _data_and_model(t, default) -> None:
    d = t.add_argument_group("data")
    d.add_argument("--data", default=default("data"), help="a .txt/.md/.jsonl/.parquet file, a folder of them, or a prepared directory (aam-func prepare); default: the embedded corpus (pydoc_data.topics)")
    d.add_argument("--prepared", default=default("prepared"), metavar="DIR", help="where --data is prepared into token shards (reused when it matches); default: OUTPUT_DIR/data")
    d.add_argument("--data-checksum", default=default("data_checksum"), metavar="SHA256", help="refuse to train unless the prepared data has this checksum (recorded in checkpoints)")
    d.add_argument("--text-field", default=default("text_field"), help="the text field of .jsonl records")
    d.add_argument("--val-fraction", type=field_type("val_fraction"), default=default("val_fraction"), help="held-out share of the corpus")
    d.add_argument("--tokenizer", default=default("tokenizer"), help="a local tokenizer directory or a cached model name; default: train a byte-level BPE on the corpus")
    d.add_argument("--vocab-size", type=field_type("vocab_size"), default=default("vocab_size"), help="BPE vocabulary size when training a tokenizer")
    m = t.add_argument_group("model")
    m.add_argument("--d-model", type=field_type("d_model"), default=default("d_model"))
    m.add_argument("--n-layers", type=field_type("n_layers"), default=default("n_layers"))
    m.add_argument("--n-heads", type=field_type("n_heads"), default=default("n_heads"))
    m.add_argument("--d-ff", type=field_type("d_ff"), default=default("d_ff"), help="default: 4 * d_model")
    m.add_argument("--max-seq-len", type=field_type("max_seq_len"), default=default("max_seq_len"), help="the model's maximum length; default: --seq-len")
    m.add_argument("--dropout", type=field_type("dropout"), default=default("dropout"))
    m.add_argument("--attention-type", choices=ATTENTION_TYPES, default=default("attention_type"))
    m.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=default("attention_backend"),
                   help="default: auto, except math under bf16 on CPU (torch's CPU flash-attention backward is slow in bf16)")
    m.add_argument("--position-encoding", choices=POSITION_ENCODINGS, default=default("position_encoding"))
    m.add_argument("--gradient-checkpointing", action="store_true", default=default("gradient_checkpointing"),
                   help="recompute blocks in the backward (less memory)")
    m.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=default("document_mask"),
                   help="packed blocks: each token attends within its own document only, positions restart per "
                        "document, the cross-document target is not scored (docs/attention.md)")


def _optimisation(t, default) -> None:
    o = t.add_argument_group("optimisation")
    o.add_argument("--steps", type=field_type("steps"), default=default("steps"), help="total optimizer steps")
    o.add_argument("--batch-size", type=field_type("batch_size"), default=default("batch_size"))
    o.add_argument("--seq-len", type=field_type("seq_len"), default=default("seq_len"))
    o.add_argument("--accumulate", type=field_type("accumulate"), default=default("accumulate"), help="micro-batches per step (gradient accumulation)")
    o.add_argument("--lr", type=field_type("lr"), default=default("lr"), help="peak learning rate (warmup, then cosine to lr/10)")
    o.add_argument("--warmup-steps", type=field_type("warmup_steps"), default=default("warmup_steps"), help="default: 10%% of --steps")
    o.add_argument("--weight-decay", type=field_type("weight_decay"), default=default("weight_decay"))
    o.add_argument("--max-grad-norm", type=field_type("max_grad_norm"), default=default("max_grad_norm"))
    o.add_argument("--precision", choices=PRECISION_FLAG_CHOICES, default=default("precision"),
                   help="auto: bf16 where the hardware runs it fast (CPU with AMX/AVX512-BF16, recent GPUs), else fp32")
    o.add_argument("--compile", action="store_true", default=default("compile"), help="torch.compile the train step")
    o.add_argument("--seed", type=int, default=default("seed"))
    o.add_argument("--optimizer", choices=RUN_OPTIMIZERS, default=default("optimizer"),
                   help="adamw (default), muon (hidden matrices; AdamW at --lr on the rest), adafactor, schedule-free, lion")
    o.add_argument("--muon-lr", type=field_type("muon_lr"), default=default("muon_lr"), help="--optimizer muon: peak learning rate of the matrices")
    o.add_argument("--muon-momentum", type=field_type("muon_momentum"), default=default("muon_momentum"), help="--optimizer muon: momentum")
    o.add_argument("--ema", type=field_type("ema"), default=default("ema"), metavar="DECAY",
                   help="keep an exponential moving average of the params; evaluation, samples and the checkpoint use it")


def _run(t, default) -> None:
    r = t.add_argument_group("run")
    r.add_argument("--eval-every", type=field_type("eval_every"), default=default("eval_every"), help="evaluate every N steps (0: only at the end)")
    r.add_argument("--eval-batches", type=field_type("eval_batches"), default=default("eval_batches"), help=f"validation batches per evaluation (a fixed set spread over the held-out split); default: {DEFAULT_EVAL_BATCHES}")
    r.add_argument("--save-every", type=field_type("save_every"), default=default("save_every"), help="checkpoint every N steps (0: at the end and on Ctrl-C)")
    r.add_argument("--keep-checkpoints", type=field_type("keep_checkpoints"), default=default("keep_checkpoints"),
                   metavar="K", help="checkpoints kept: the newest as checkpoint/, the K-1 before it as checkpoint-STEP/")
    r.add_argument("--max-skipped-steps", type=field_type("max_skipped_steps"), default=default("max_skipped_steps"),
                   metavar="N", help="steps with an inf/NaN loss or gradient are skipped; after more than N in a row "
                                     "the run saves and stops")
    r.add_argument("--output-dir", default=default("output_dir"), help="run directory: checkpoint/, tokenizer/, data/ (prepared shards), metrics.jsonl")
    r.add_argument("--overwrite", action="store_true", default=default("overwrite"),
                   help="replace the run already in --output-dir (its checkpoints, adapters and metrics)")
    r.add_argument("--log-to", choices=LOG_TO_CHOICES, default=default("log_to"),
                   help="metrics.jsonl is always written; tensorboard adds event files in OUTPUT_DIR/tensorboard")
    r.add_argument("--resume", nargs="?", const="", default=default("resume"), metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: the one in --output-dir); --steps is the total")
    r.add_argument("--stop-after", type=field_type("stop_after"), default=default("stop_after"), metavar="N",
                   help="save and stop after N steps of this invocation (split a run into pieces)")
    r.add_argument("--sample-tokens", type=field_type("sample_tokens"), default=default("sample_tokens"), help="length of the sample printed at the end (0: none)")
    r.add_argument("--log-every", type=field_type("log_every"), default=default("log_every"), help="progress line interval when not on a terminal")
    r.add_argument("--device", default=default("device"), help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--dist-timeout", type=field_type("dist_timeout"), default=default("dist_timeout"), metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other processes before failing")


def _fine_tuning(t, default) -> None:
    f = t.add_argument_group("fine-tuning")
    f.add_argument("--init-from", default=default("init_from"), metavar="CHECKPOINT",
                   help="start from this checkpoint of aam-func train, transformers model directory or cached model name "
                        "(its config, params and tokenizer; a fresh optimizer state); without --lora-rank: full fine-tuning")
    f.add_argument("--lora-rank", type=field_type("lora_rank"), default=default("lora_rank"), metavar="R",
                   help="train LoRA adapters of rank R on the frozen --init-from weights instead of all weights")
    f.add_argument("--lora-alpha", type=field_type("lora_alpha"), default=default("lora_alpha"), metavar="A",
                   help="LoRA scale numerator, scale = A / R (None: 2 * R)")
    f.add_argument("--lora-targets", default=default("lora_targets"), metavar="GLOBS",
                   help="comma-separated globs or names of the adapted weights (None: " + ",".join(DEFAULT_CLI_TARGETS) + ")")
    f.add_argument("--lora-dropout", type=field_type("lora_dropout"), default=default("lora_dropout"), metavar="P",
                   help="dropout on the input of the low-rank branch")


def _privacy(t, default) -> None:
    from ..privacy import ACCOUNTANTS

    p = t.add_argument_group("differential privacy (docs/privacy.md)")
    p.add_argument("--dp-epsilon", type=field_type("dp_epsilon"), default=default("dp_epsilon"), metavar="E",
                   help="train with DP-SGD to (E, delta)-DP per training block: Poisson sampling at rate "
                        "batch-size/N, per-block clipping, noise set for E after --steps steps")
    p.add_argument("--dp-delta", type=field_type("dp_delta"), default=default("dp_delta"), metavar="D",
                   help="delta, below 1/N for N training blocks (None: 1/(10 N))")
    p.add_argument("--dp-clip", type=field_type("dp_clip"), default=default("dp_clip"), metavar="C",
                   help="per-block gradient clip norm (the initial one with --dp-adaptive-clip)")
    p.add_argument("--dp-accountant", choices=ACCOUNTANTS, default=default("dp_accountant"),
                   help="prv: tightest guarantee; rdp: Renyi DP; gdp: Gaussian DP by the CLT (an approximation)")
    p.add_argument("--dp-adaptive-clip", type=field_type("dp_adaptive_clip"), default=default("dp_adaptive_clip"),
                   metavar="QUANTILE", help="move the clip norm to this quantile of the per-block norms, privately "
                                            "(Andrew et al. 2021)")


def given_flags(argv) -> set:
    """The train options that ``argv`` (the arguments after ``train``) sets explicitly (dests),
    whatever their values."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p, defaults=False)
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns))


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from .. import run

    cfg = RunConfig.from_flags(vars(args), given_flags(argv[1:]))
    with ignoring_stop_signals() as stopping:
        result = run.train(cfg, log=run.console, progress=True)
        stopping.set(result.interrupted)
    if not result.interrupted:
        return 0
    status = exit_status(result.signal)
    if result.is_main and result.adapter_dir is not None:
        print(f"\ninterrupted at step {result.step}: merged weights saved to {result.checkpoint_dir}, adapters to "
              f"{result.adapter_dir} (a LoRA run cannot be resumed; fine-tune further with --init-from "
              f"{result.checkpoint_dir})", file=sys.stderr, flush=True)
    elif result.is_main:
        launch = "aam-func" if result.world_size == 1 else f"torchrun --nproc-per-node {result.world_size} -m aam_func"
        print(f"\ninterrupted at step {result.step}: checkpoint saved to {result.checkpoint_dir} "
              f"(continue with: {launch} train --output-dir {args.output_dir} --resume --steps {args.steps})",
              file=sys.stderr, flush=True)
    return status
