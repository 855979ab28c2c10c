"""Where a run's words and numbers go: progress lines through a ``log`` callable (none by
default: the library is silent; ``aam-func train`` passes :func:`console`, stdout above any
progress bar), records appended to ``metrics.jsonl``."""

from __future__ import annotations

import json
import sys
from typing import Callable

from tqdm import tqdm

__all__ = ["Log", "console", "write_metrics"]

Log = Callable[[str], None]


def console(text: str) -> None:
    """One line on stdout, written above the progress bar when one is shown, and flushed."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def write_metrics(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
