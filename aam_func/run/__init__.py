"""The training run as library code: what ``aam-func train`` does, for the CLI and the tests
to call (and any program that wants a whole run). Silent by default: pass ``log`` for the
progress lines (``log=run.console`` prints them as the CLI does) and ``progress=True`` for a bar.

    from aam_func import run

    cfg = run.RunConfig(data="notes/", steps=200, output_dir="runs/notes")   # frozen, validated
    prepared = run.prepare(cfg, "cpu", log=print)   # corpus, tokenizer, model, params, optimizer (resumed)
    result = run.loop(prepared)                     # steps, evaluation, metrics.jsonl, checkpoints, sample
    result = run.train(cfg)                         # the same in one call (and data parallel under torchrun)

Modules: :mod:`.config` (RunConfig and its resolution against a checkpoint), :mod:`.preparation`
(rank 0's preparation, shared with the other ranks), :mod:`.state` (the prepared Run: params,
optimizer, LoRA), :mod:`.training` (the loop), :mod:`.saving` (checkpoint and adapters), :mod:`.output`
(progress lines, metrics.jsonl), :mod:`.launch` (device, process group, signals), :mod:`.evaluation` (a checkpoint for
inference and its held-out loss: ``aam-func generate`` and ``eval``). Errors are
:class:`RunError` (a ValueError), never the CLI's.
"""

from .config import RunConfig, RunError, attention_backend
from .evaluation import evaluate_checkpoint, load_for_inference
from .launch import resolve_device, train
from .training import RunResult, evaluate, loop
from .output import console
from .preparation import PeerFailed, Prepared, prepare
from .state import Run

__all__ = ["RunConfig", "RunError", "Run", "RunResult", "Prepared", "PeerFailed", "prepare", "loop", "train",
           "evaluate", "resolve_device", "attention_backend", "console", "evaluate_checkpoint", "load_for_inference"]
