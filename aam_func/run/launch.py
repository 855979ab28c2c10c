"""A whole run in one call, as ``aam-func train`` makes it: the device, the process group when
torchrun launched this process (with SIGINT/SIGTERM turned into a clean stop), prepare, loop.

    result = aam_func.run.train(RunConfig(steps=100, output_dir="runs/x"))
"""

from __future__ import annotations

import contextlib
import signal
from typing import Optional

import torch

from .. import distributed
from .config import RunConfig, RunError
from .training import RunResult, loop
from .output import Log
from .preparation import prepare

__all__ = ["train", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked: a name torch does not know, or CUDA without a GPU, is a RunError."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA device is available")
    return dev


def train(cfg: RunConfig, *, log: Optional[Log] = None, progress: bool = False) -> RunResult:
    """Run ``cfg`` on ``cfg.device``: in this process, or data-parallel when the environment
    describes a torchrun job of several processes (``cfg.batch_size`` is then the global batch).
    Silent unless asked: ``log`` receives the progress lines, ``progress`` shows a bar on a
    terminal (see :func:`aam_func.run.loop`)."""
    device = resolve_device(cfg.device)
    world = distributed.env_world().world_size
    if cfg.resume is None:  # fail on every rank alike, before any collective (a resumed run's batch size is the checkpoint's)
        cfg.check_world_size(world)
    dctx = distributed.init_from_env(device, timeout=cfg.dist_timeout) if world > 1 else None
    if dctx is None:
        return loop(prepare(cfg, device, log=log), progress=progress)
    with _stop_on_signals(dctx):
        result = loop(prepare(cfg, dctx.device, dctx, log=log), progress=progress)
    dctx.close()
    return result


@contextlib.contextmanager
def _stop_on_signals(dctx):
    """SIGINT and SIGTERM (torchrun forwards Ctrl-C to its workers as SIGTERM) mark the group as
    stopping and raise KeyboardInterrupt, which the loop answers by saving and stopping."""

    def stop(signum, frame):
        dctx.stopping = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
