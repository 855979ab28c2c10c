"""What the commands share: the error type for a bad combination of arguments, and the argparse
``type=`` parsers (thin wrappers over :mod:`aam_func.checks` that keep argparse's own messages)."""

from __future__ import annotations

import argparse
from typing import Optional

from ..checks import check_int, check_number
from ..run.config import INT_MINIMUM, NUMBER_RANGE

__all__ = ["CLIError", "positive_int", "nonneg_int", "number", "field_type", "checkpoint_arg"]


class CLIError(ValueError):
    """A bad combination of command-line arguments."""


def positive_int(text: str) -> int:
    try:
        return check_int("value", int(text), min=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def nonneg_int(text: str) -> int:
    try:
        return check_int("value", int(text), min=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None


def number(lo: float, hi: Optional[float] = None, lo_open: bool = False, finite: bool = True):
    """A parser of numbers in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``; ``hi`` None: no upper
    bound), finite unless ``finite=False`` (so ``--lr inf`` is refused here, naming the flag)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_number("value", v, min=lo, max=hi, min_open=lo_open, finite=finite)
        except ValueError:
            what = "a finite number" if finite else "a number"
            upper = f"{hi}]" if hi is not None else ("inf)" if finite else "inf]")
            raise argparse.ArgumentTypeError(
                f"expected {what} in {'(' if lo_open else '['}{lo}, {upper}, got {text!r}") from None

    return parse


def field_type(name: str):
    """The parser of the ``aam-func train`` flag for RunConfig field ``name``: its range is the
    field's (:data:`aam_func.run.config.INT_MINIMUM`, :data:`~aam_func.run.config.NUMBER_RANGE`)."""
    if name in NUMBER_RANGE:
        return number(*NUMBER_RANGE[name])
    return positive_int if INT_MINIMUM[name] == 1 else nonneg_int


def checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (--output-dir of train)")
