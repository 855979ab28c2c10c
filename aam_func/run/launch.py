"""A whole run in one call, as ``aam-func train`` makes it: the device, the run directory's lock,
the process group when torchrun launched this process, SIGINT/SIGTERM/SIGHUP turned into a clean
stop, prepare, loop.

    result = aam_func.run.train(RunConfig(steps=100, output_dir="runs/x"))
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import distributed
from . import directory
from .config import RunConfig, RunError
from .signals import stop_on_signals
from .training import RunResult, loop
from .output import Log
from .preparation import prepare

__all__ = ["train", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked: a name torch does not know, or CUDA without a GPU, is a RunError."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunError(f"--device {name!r} is not a device (use cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name!r} is not supported for training (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA device is available")
    return dev


def train(cfg: RunConfig, *, log: Optional[Log] = None, progress: bool = False) -> RunResult:
    """Run ``cfg`` on ``cfg.device``: in this process, or data-parallel when the environment
    describes a torchrun job of several processes (``cfg.batch_size`` is then the global batch).
    Rank 0 holds the run directory's lock for the whole run and refuses to replace another run
    there (:mod:`aam_func.run.directory`); SIGINT, SIGTERM and SIGHUP save a checkpoint and stop
    (``RunResult.signal``; :mod:`aam_func.run.signals`). Silent unless asked: ``log`` receives
    the progress lines, ``progress`` shows a bar on a terminal (see :func:`aam_func.run.loop`)."""
    device = resolve_device(cfg.device)
    env = distributed.env_world()
    if cfg.resume is None:  # fail on every rank alike, before any collective (a resumed run's batch size is the checkpoint's)
        cfg.check_world_size(env.world_size)
    # rank 0 alone owns the directory; if it refuses, torchrun ends the other ranks
    owner = directory.claim(cfg) if env.rank == 0 else contextlib.nullcontext()
    with owner, stop_on_signals() as signals:
        if env.world_size == 1:
            return loop(prepare(cfg, device, log=log), progress=progress, signals=signals)
        dctx = distributed.init_from_env(device, timeout=cfg.dist_timeout)
        signals.on_stop = lambda signum: setattr(dctx, "stopping", True)
        result = loop(prepare(cfg, dctx.device, dctx, log=log), progress=progress, signals=signals)
        dctx.close()
        return result
