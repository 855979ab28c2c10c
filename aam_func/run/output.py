"""Where a run's words and numbers go: progress lines through a ``log`` callable (none by
default: the library is silent; ``aam-func train`` passes :func:`console`, stdout above any
progress bar), and the metric records of :class:`MetricsLog`: ``metrics.jsonl`` always (one
JSON line per record; ``aam-func plot`` and ``--resume`` read it), and with ``log_to
="tensorboard"`` TensorBoard event files in ``<output-dir>/tensorboard`` as well. Only rank 0
writes."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Callable, Optional

import torch
from tqdm import tqdm

__all__ = ["Log", "console", "write_metrics", "MetricsLog", "LOG_TO_CHOICES", "TENSORBOARD_TAGS", "TENSORBOARD_DIR",
           "peak_memory_mb"]

Log = Callable[[str], None]

# metrics.jsonl always; "tensorboard" adds event files ("none" and "jsonl": metrics.jsonl only)
LOG_TO_CHOICES = ("jsonl", "tensorboard", "none")
TENSORBOARD_DIR = "tensorboard"
# a record's keys and their TensorBoard tags
TENSORBOARD_TAGS = {
    "loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
    "grad_norm_clipped": "train/grad_norm_clipped", "tokens_per_s": "train/tokens_per_s",
    "skipped_steps": "train/skipped_steps", "memory_mb": "system/peak_memory_mb", "val_loss": "val/loss",
    "val_perplexity": "val/perplexity",
}


def console(text: str) -> None:
    """One line on stdout, written above the progress bar when one is shown, and flushed."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def write_metrics(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of this process so far: CUDA's allocator peak on a GPU, else the peak
    resident set size (``ru_maxrss``: kB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsLog:
    """The metric sinks of one run on one rank (rank 0 writes; the others hold a closed log).

    ``record(record)`` appends ``record`` (a dict with ``step``) to ``metrics.jsonl`` and, with
    TensorBoard on, writes each numeric key of :data:`TENSORBOARD_TAGS` as a scalar at that step.
    ``start``: the step the run (re)starts from; TensorBoard hides the events a killed run wrote
    after it (``purge_step``), as :func:`aam_func.run.directory.trim_metrics` does for the file."""

    def __init__(self, output_dir: str, *, log_to: str = "jsonl", writes: bool = True, start: int = 0,
                 config: Optional[dict] = None, log: Optional[Log] = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writes = writes
        self.board = None
        if writes and log_to == "tensorboard":
            self.board = _tensorboard(os.path.join(output_dir, TENSORBOARD_DIR), start, log)
            if self.board is not None and config is not None and start == 0:
                rows = "\n".join(f"| {k} | {v!r} |" for k, v in sorted(config.items()))
                self.board.add_text("run/config", "| setting | value |\n|---|---|\n" + rows, 0)

    def record(self, record: dict) -> None:
        if not self.writes:
            return
        write_metrics(self.path, record)
        if self.board is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


def _tensorboard(directory: str, start: int, log: Optional[Log]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if log is not None:
            log("--log-to tensorboard: the tensorboard package is not installed (pip install 'aam-func[tensorboard]'); "
                "writing metrics.jsonl only")
        return None
    return SummaryWriter(directory, purge_step=start + 1 if start else None)
