"""The run directory (``--output-dir``): one run at a time, never replaced by accident.

- :func:`claim` takes the directory's lock file ``.lock`` (an exclusive ``flock`` held for the
  whole run, with the holder's PID, host and start time inside for the message a second run
  gets). The kernel drops a ``flock`` when its process dies, however it dies, so a lock left by
  a killed run is stale by construction and taken over silently; where the filesystem has no
  ``flock``, a lock whose PID no longer runs on this host is taken over instead.
- A directory that already holds a run (a checkpoint or ``metrics.jsonl``) is continued with
  ``--resume`` or replaced with ``--overwrite``; a fresh run into it is refused with both
  commands. ``--overwrite`` removes the run's checkpoints, adapters and metrics (and TensorBoard
  logs), nothing else.
- On ``--resume``, records of ``metrics.jsonl`` past the checkpoint's step (steps a killed run
  took after its last save, which the resumed run takes again) are dropped, so the file holds
  each step once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import os
import shutil
import socket
from typing import Optional

from ..checkpoint import CheckpointError, kept_checkpoints, resolve_checkpoint
from ..processes import pid_alive
from .config import RunConfig, RunError
from .output import TENSORBOARD_DIR

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the PID check alone
    fcntl = None

__all__ = ["claim", "LOCK_FILE", "holds_run", "trim_metrics"]

LOCK_FILE = ".lock"
_RUN_FILES = ("checkpoint", "metrics.jsonl", "adapter", TENSORBOARD_DIR)


@contextlib.contextmanager
def claim(cfg: RunConfig):
    """Create ``cfg.output_dir`` if needed, lock it for this process, and check that this run may
    write there (see the module docstring); the lock is released when the block ends."""
    out = _make_dir(cfg.output_dir)
    fd = _lock(out)
    try:
        _check_contents(cfg, out)
        yield out
    finally:
        _unlock(out, fd)


def _make_dir(output_dir: str) -> str:
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--output-dir {output_dir} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunError(f"--output-dir {output_dir} cannot be created: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunError(f"--output-dir {output_dir} is not writable by this user")
    return out


def _lock(out: str) -> int:
    """An open descriptor of ``out/.lock`` holding an exclusive lock, with this process's record."""
    path = os.path.join(out, LOCK_FILE)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"--output-dir {out}: cannot create its lock file: {e.strerror or e}") from None
        if not _try_lock(fd, path):
            holder = _read_holder(path)
            os.close(fd)
            raise RunError(f"--output-dir {out} is in use by another run ({_describe(holder)}); wait for it to end "
                           "or choose another --output-dir")
        # the file may have been removed (and made anew) by its previous holder between our open
        # and our lock: only the lock on the file that is at ``path`` counts
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _try_lock(fd: int, path: str) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    holder = _read_holder(path)  # no flock here: the recorded PID decides
    pid = holder.get("pid")
    return not (holder.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid))


def _read_holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "its lock file holds no record yet"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _unlock(out: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(out, LOCK_FILE))  # while still holding it: the next run makes a new file
    os.close(fd)


def holds_run(out: str) -> Optional[str]:
    """What in ``out`` makes it a run directory (a description for the message), or None."""
    ckpt = os.path.join(out, "checkpoint")
    try:
        found = resolve_checkpoint(ckpt)
    except CheckpointError:
        found = None
    if found is not None or kept_checkpoints(ckpt):
        return f"a checkpoint in {ckpt}"
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        return f"the metrics of a run in {os.path.join(out, 'metrics.jsonl')}"
    return None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.commonpath([path, directory]) == directory


def _check_contents(cfg: RunConfig, out: str) -> None:
    """A fresh run (or one resumed from elsewhere) into a directory holding a run: refused unless
    ``overwrite``, which then removes that run's files."""
    resuming_here = cfg.resume is not None and (cfg.resume == "" or _inside(cfg.resume, out))
    if cfg.overwrite and cfg.resume is not None:
        raise RunError("--overwrite starts a run afresh and --resume continues one; give one of them")
    if cfg.overwrite and cfg.init_from is not None and _inside(cfg.init_from, out):
        raise RunError(f"--init-from {cfg.init_from} lies inside --output-dir {cfg.output_dir}, which --overwrite "
                       "would delete; write the new run to another --output-dir")
    existing = None if resuming_here else holds_run(out)
    if existing is None:
        if cfg.resume is not None:
            trim_metrics(out, cfg.resume or out)
        return
    if not cfg.overwrite:
        raise RunError(f"--output-dir {cfg.output_dir} already holds a run ({existing}); continue it with "
                       f"`aam-func train --output-dir {cfg.output_dir} --resume --steps N`, or replace it with "
                       f"--overwrite, or choose another --output-dir")
    _remove_run(out)


def _remove_run(out: str) -> None:
    ckpt = os.path.join(out, "checkpoint")
    for path in [os.path.join(out, name) for name in _RUN_FILES] + glob.glob(glob.escape(ckpt) + "[-.]*"):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def trim_metrics(out: str, checkpoint: str) -> None:
    """Drop the records of ``out/metrics.jsonl`` after the step of ``checkpoint`` (atomically)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return
    try:
        with open(os.path.join(resolve_checkpoint(checkpoint), "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, CheckpointError, AttributeError):
        return  # the resume itself reports an unreadable checkpoint
    if not isinstance(step, int):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [ln for ln in lines if _record_step(ln) is None or _record_step(ln) <= step]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _record_step(line: str) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
