"""Preparing a run: what rank 0 alone does (resolve the config against the checkpoint being
resumed or fine-tuned, read and split the corpus, get a tokenizer, build the ModelConfig,
tokenize), shared with the other ranks as one frozen :class:`Prepared`, then the trainable state
(:mod:`aam_func.run.state`).

    run = prepare(RunConfig(steps=100, output_dir="runs/x"), "cpu", log=print)
    result = loop(run)

The corpus becomes token shards (:func:`aam_func.data.prepare_corpus`) in ``--prepared`` or
``<output-dir>/data``, reused when it was prepared from the same inputs and tokenizer; ``--data``
may also be a prepared directory. The prepared data's checksum is recorded in the config (so in
checkpoints) and checked on resume and evaluation (:func:`run_data`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import ModelConfig
from ..data import DataError, is_prepared_dir, open_prepared, prepare_corpus
from ..tokenizer import Tokenizer
from ..train import resolve_precision
from .config import RunConfig, RunError, attention_backend, document_mask_on
from .output import Log
from .state import build_run, setup_lora

__all__ = ["Prepared", "PeerFailed", "prepare", "load_init_checkpoint", "run_data"]


@dataclass(frozen=True)
class Prepared:
    """What every rank needs from rank 0's preparation: the resolved config (resume and
    --init-from applied, precision resolved for the device, the data's checksum recorded), the
    model config and the prepared data directory (token shards, opened by every rank)."""

    config: RunConfig
    model_config: ModelConfig
    data_dir: str


@dataclass(frozen=True)
class Sources:
    """Rank 0's extra results: the checkpoints read (resumed or --init-from) and the tokenizer."""

    resumed: object = None
    init: object = None
    tokenizer: object = None


class PeerFailed(Exception):
    """Rank 0 failed while preparing the run (and said why); this rank stops quietly.
    ``interrupted``: rank 0 was interrupted (Ctrl-C) rather than given bad input."""

    def __init__(self, interrupted: bool):
        super().__init__("rank 0 was interrupted while preparing the run" if interrupted
                         else "rank 0 failed to prepare the run")
        self.interrupted = interrupted


def prepare(cfg: RunConfig, device, dist_ctx=None, *, log: Optional[Log] = None):
    """The :class:`aam_func.run.Run` of ``cfg`` on ``device``: rank 0 prepares (see the module
    docstring) and, under data parallelism (``dist_ctx``), broadcasts; then every rank builds the
    model, loader, params and optimizer. ``log`` receives the progress lines (rank 0 only;
    default None: none are written; the CLI passes :func:`aam_func.run.console`)."""
    t_start = time.perf_counter()
    device = torch.device(device)
    is_main = dist_ctx is None or dist_ctx.is_main
    say = log if (is_main and log is not None) else _silent
    prepared, sources = _share(cfg, device, dist_ctx, say)
    return build_run(prepared, sources, device, dist_ctx, say, t_start)


def _silent(text: str) -> None:
    pass


def _share(cfg: RunConfig, device, dctx, say: Log) -> tuple[Prepared, Sources]:
    """:func:`_prepare_main` on rank 0, its :class:`Prepared` sent to the other ranks; on failure
    its kind, so that every rank stops on bad input."""
    if dctx is None:
        return _prepare_main(cfg, device, 1, say)
    if dctx.is_main:
        try:
            prepared, sources = _prepare_main(cfg, device, dctx.world_size, say)
        except BaseException as e:
            dctx.broadcast_object({"failed": "interrupted" if isinstance(e, KeyboardInterrupt) else "error"})
            raise
        dctx.broadcast_object({"prepared": prepared})
        return prepared, sources
    payload = dctx.broadcast_object()
    if "failed" in payload:
        raise PeerFailed(payload["failed"] == "interrupted")
    return payload["prepared"], Sources()


def _prepare_main(cfg: RunConfig, device, world: int, say: Log) -> tuple[Prepared, Sources]:
    """Rank 0's part (the only part without data parallelism)."""
    out_dir = os.path.abspath(cfg.output_dir)
    resumed = init = None
    if cfg.resume is not None:
        resumed = load_checkpoint(cfg.resume or out_dir, load_optimizer=False)
        cfg = cfg.for_resume(resumed)
    cfg.check_world_size(world, from_checkpoint=resumed is not None)
    if cfg.init_from is not None:
        init = load_init_checkpoint(cfg.init_from)
        cfg = cfg.for_init_from(init)
        if cfg.lora_rank is not None:  # validate rank/targets here, on rank 0, before any training work
            setup_lora(cfg, init.params)
    # a private run (--dp-epsilon) clips and accounts in fp32: "auto" means fp32 there
    cfg = dataclasses.replace(cfg, precision="fp32" if cfg.dp_epsilon is not None else resolve_precision(cfg.precision, device))
    source = resumed if resumed is not None else init
    tok = _tokenizer(cfg, source)
    expected = cfg.data_checksum
    if resumed is not None:
        saved = resumed.train_state.get("args", {})
        cfg = dataclasses.replace(cfg, prepared=cfg.prepared or saved.get("prepared"))
        expected = saved.get("data_checksum") or expected
    tok, pd = run_data(cfg.data, cfg.prepared, out_dir, tok, vocab_size=cfg.vocab_size, text_field=cfg.text_field,
                       val_fraction=cfg.val_fraction, expected=expected, log=say)
    tok.save(os.path.join(out_dir, "tokenizer"))
    cfg = dataclasses.replace(cfg, data=None if cfg.data is None else os.path.abspath(cfg.data),
                              prepared=None if cfg.prepared is None else os.path.abspath(cfg.prepared),
                              data_checksum=pd.checksum)
    model_config = _model_config(cfg, resumed, init, tok, device)
    cfg = dataclasses.replace(cfg, document_mask=model_config.document_mask)  # the setting in force, recorded
    if tok.vocab_size > model_config.vocab_size:
        raise RunError(f"the tokenizer has {tok.vocab_size} tokens but the model embeds only {model_config.vocab_size}")
    if cfg.seq_len > model_config.max_seq_len:
        raise RunError(f"--seq-len {cfg.seq_len} is above the model's maximum sequence length "
                       f"{model_config.max_seq_len} (raise --max-seq-len or lower --seq-len)")
    return Prepared(cfg, model_config, pd.path), Sources(resumed=resumed, init=init, tokenizer=tok)


def run_data(data: Optional[str], prepared: Optional[str], out_dir: str, tokenizer, *, vocab_size: int,
             text_field: str, val_fraction: float, expected: Optional[str] = None, log: Optional[Log] = None):
    """``(tokenizer, PreparedData)`` of a run: ``data`` itself when it is a prepared directory
    (verified, and made with ``tokenizer`` when one is given), else ``data`` (None: the embedded
    corpus) prepared into ``prepared`` or ``<out_dir>/data`` (reused when it matches). Without a
    ``tokenizer``, the prepared directory's (a BPE trained there when it is new). ``expected``:
    the checksum the data must have (a resumed checkpoint's, or --data-checksum)."""
    if is_prepared_dir(data):
        pd = open_prepared(data, tokenizer=tokenizer)
        if log is not None:
            log(f"prepared data: {pd.path}")
    else:
        target = prepared if prepared is not None else os.path.join(out_dir, "data")
        pd = prepare_corpus(data, target, tokenizer=tokenizer, vocab_size=vocab_size, text_field=text_field,
                            val_fraction=val_fraction, log=log)
    if expected is not None and pd.checksum != expected:
        raise DataError(f"{os.path.join(pd.path, 'index.json')}: the data's checksum is {pd.checksum[:16]}, not "
                        f"{expected[:16]} as recorded for this run: the corpus or its prepared shards changed since")
    return (tokenizer if tokenizer is not None else pd.load_tokenizer()), pd


def load_init_checkpoint(path: str):
    """The ``--init-from`` checkpoint (without optimizer state); it must hold a tokenizer. A
    transformers model directory or a cached model name is read as one (step 0, its own
    tokenizer: :func:`aam_func.interop.pretrained.load_pretrained_model`)."""
    from ..interop import pretrained

    if pretrained.is_init_source(path):
        try:
            return pretrained.load_pretrained_model(path)
        except pretrained.PretrainedError as e:
            raise RunError(f"--init-from: {e}") from None
    try:
        init = load_checkpoint(path, load_optimizer=False)
    except CheckpointError as e:
        raise RunError(f"--init-from {path} is not a checkpoint of aam-func train: {e}") from None
    try:
        init.require_tokenizer_dir()
    except CheckpointError as e:
        raise RunError(f"--init-from {path}: {e}") from None
    return init


def _tokenizer(cfg: RunConfig, source):
    """From the checkpoint (resumed or --init-from) or a user directory/name; None: the prepared
    data's (trained on its training documents when it is prepared anew)."""
    if source is not None:
        try:
            return source.load_tokenizer()
        except CheckpointError as e:
            raise RunError(str(e)) from None
    if cfg.tokenizer is not None:
        return Tokenizer.load(cfg.tokenizer)
    return None


def _model_config(cfg: RunConfig, resumed, init, tok, device) -> ModelConfig:
    """The resumed checkpoint's; the --init-from checkpoint's with the settings that leave the
    params' shapes alone changed; or a new one from the config's model fields."""
    if resumed is not None:
        return resumed.cfg
    training = dict(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                    mixed_precision=cfg.precision != "fp32")
    try:
        if init is not None:  # None: the checkpoint's setting
            changes = dict(training)
            if cfg.dropout is not None:
                changes.update(dropout=cfg.dropout, attention_dropout=0.0 if cfg.dropout == 0 else None)
            if cfg.attention_backend is not None:
                changes["attention_backend"] = cfg.attention_backend
            if cfg.gradient_checkpointing is not None:
                changes["gradient_checkpointing"] = cfg.gradient_checkpointing
            if "document_mask" in cfg.explicit_fields():  # else the checkpoint's (its model was trained so)
                on = document_mask_on(cfg, changes.get("attention_backend", init.cfg.attention_backend))
                changes.update(document_mask=on, **({"eos_token_id": tok.eos_token_id} if on else {}))
            return init.cfg.replace(**changes)
        backend = attention_backend(cfg.attention_backend, cfg.precision, torch.device(device).type)
        return ModelConfig(
            vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
            max_seq_len=cfg.max_seq_len or cfg.seq_len, dropout=cfg.dropout,
            attention_dropout=0.0 if cfg.dropout == 0 else None, attention_type=cfg.attention_type,
            attention_backend=backend,
            position_encoding=cfg.position_encoding, gradient_checkpointing=cfg.gradient_checkpointing, **training,
            **({"document_mask": True, "eos_token_id": tok.eos_token_id} if document_mask_on(cfg, backend) else {}))
    except ValueError as e:
        raise RunError(f"invalid model configuration: {e}") from None
