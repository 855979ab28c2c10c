import math

import numpy as np
import pytest

from aam_func.checks import ArgumentTypeError, check_bool, check_choice, check_int, check_number, is_int, is_number


def test_kinds_exclude_bool():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(2.5) and is_number(np.float32(1)) and not is_number(False) and not is_number("1")


def test_check_int_range_and_messages():
    assert check_int("steps", 5, min=1) == 5 and type(check_int("n", np.int64(2))) is int
    assert check_int("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        check_int("steps", 0, min=1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\], got 5"):
        check_int("k", 5, min=1, max=4)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ArgumentTypeError, match="must be an int"):
            check_int("steps", bad, min=1)
    # a wrong kind is both a TypeError and a ValueError
    with pytest.raises(TypeError):
        check_int("steps", True)
    with pytest.raises(ValueError):
        check_int("steps", True)


def test_check_number_ranges():
    assert check_number("q", 1, min=0, min_open=True, max=1) == 1.0
    assert check_number("x", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"q must be a finite number in \(0, 1\], got 0"):
        check_number("q", 0, min=0, min_open=True, max=1)
    with pytest.raises(ValueError, match=r"eps must be a finite number in \[0, 1\), got 1.0"):
        check_number("eps", 1.0, min=0, max=1, max_open=True)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite number"):
            check_number("lr", bad)
    with pytest.raises(ValueError, match="number"):
        check_number("lr", math.nan, finite=False)
    with pytest.raises(ArgumentTypeError, match=r"lr must be a finite number > 0, got True"):
        check_number("lr", True, min=0, min_open=True)
    assert check_number("lr", None, allow_none=True) is None


def test_check_choice():
    assert check_choice("norm", "rms", ("layer", "rms")) == "rms"
    with pytest.raises(ValueError, match=r"norm must be one of 'layer', 'rms', got 'batch'"):
        check_choice("norm", "batch", ("layer", "rms"))


def test_check_bool():
    assert check_bool("nesterov", True) is True and check_bool("nesterov", False) is False
    for bad in (1, 0, "yes", None, np.bool_(True)):
        with pytest.raises(ArgumentTypeError, match=r"nesterov must be a bool, got"):
            check_bool("nesterov", bad)
