"""Facts about processes on this host that the run directory's lock and the data preparation's
clean-up both need: whether a PID still runs."""

from __future__ import annotations

import os

__all__ = ["pid_alive"]


def pid_alive(pid) -> bool:
    """Whether a process with this PID runs on this host (a PID we may not signal counts as
    alive; anything that is not a positive int, as not)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
