"""Argument validators: the one owner of "is this an int / a number in range" for every module.

One rule for the kinds (``bool`` is neither an int nor a number here, though Python says it is
both: ``steps=True`` is a mistake, not 1) and one message format, naming the argument, what was
expected and what was given::

    check_int("every_k", every_k, min=1)          # every_k must be an int >= 1, got 0
    check_number("sample_rate", q, min=0, min_open=True, max=1)
                                                  # sample_rate must be a number in (0, 1], got 1.5

A value of the wrong kind raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and
a ``ValueError`` (callers that catch either keep working); a value of the right kind out of
range raises ``ValueError``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, Optional

__all__ = ["ArgumentTypeError", "is_int", "is_number", "check_bool", "check_int", "check_number", "check_choice"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a bool or a float where an int is expected, a string where a
    number is): both a TypeError and a ValueError."""


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``numbers.Integral``: Python and numpy integers)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool (``numbers.Real``: int, float, numpy scalars)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_fmt(hi)}"
    return ""


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; else an :class:`ArgumentTypeError` naming ``name`` (``1`` or
    ``"yes"`` for a flag is a mistake, not True)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_int(name: str, value: Any, *, min: Optional[int] = None, max: Optional[int] = None,
              allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[min, max]``; else an error
    naming ``name``. ``allow_none`` lets ``None`` through unchanged."""
    if value is None and allow_none:
        return None
    what = f"an int{_range_text(min, max, False, False)}{' or None' if allow_none else ''}"
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, *, min: Optional[float] = None, max: Optional[float] = None,
                 min_open: bool = False, max_open: bool = False, finite: bool = True,
                 allow_none: bool = False) -> Optional[float]:
    """``value`` as a ``float`` if it is a real number (not a bool, not NaN) in the range given by
    ``min``/``max`` (open ends with ``min_open``/``max_open``), finite unless ``finite=False``;
    else an error naming ``name``. ``allow_none`` lets ``None`` through unchanged."""
    if value is None and allow_none:
        return None
    what = (f"{'a finite' if finite else 'a'} number{_range_text(min, max, min_open, max_open)}"
            f"{' or None' if allow_none else ''}")
    if not is_number(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    v = float(value)
    bad = (math.isnan(v) or (finite and math.isinf(v))
           or (min is not None and (v <= min if min_open else v < min))
           or (max is not None and (v >= max if max_open else v > max)))
    if bad:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    """``value`` if it is one of ``choices``; else a ValueError listing them."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
