"""Stopping a run on a signal: SIGINT (Ctrl-C), SIGTERM (what ``timeout``, docker, Kubernetes and
SLURM send, and what torchrun forwards to its workers) and SIGHUP (a closed terminal) end the run
with a checkpoint at the last completed step and the conventional exit status ``128 + signum``.

    with stop_on_signals() as stop:
        ...                                    # a signal here raises StopRequested
        with stop.deferred():                  # a signal here waits for the block to end
            save_checkpoint(...)

Only the first signal stops the run; later ones (a second Ctrl-C while the checkpoint is being
written) are recorded and ignored, so a save is never cut in half by an impatient user and no
temporary directory is left behind. Outside the main thread (where Python cannot install
handlers) nothing is installed and the run is stopped only by KeyboardInterrupt as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

__all__ = ["StopRequested", "StopSignals", "stop_on_signals", "ignoring_stop_signals", "STOP_SIGNALS", "exit_status"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which. A KeyboardInterrupt, so code that handles
    Ctrl-C (the training loop's save-and-stop) handles every stop signal alike."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def exit_status(signum: Optional[int]) -> int:
    """The shell's status for a process ended by ``signum`` (``128 + signum``; 130 for Ctrl-C)."""
    return 128 + (signum if signum is not None else signal.SIGINT)


class StopSignals:
    """The installed handlers' state: ``signum`` of the first stop signal (None before one),
    ``on_stop`` called once with it (under torchrun: mark the process group as stopping)."""

    def __init__(self, on_stop=None):
        self.signum: Optional[int] = None
        self.on_stop = on_stop
        self._deferring = 0
        self._pending = False

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # already stopping: the save in progress finishes
            return
        self.signum = signum
        if self.on_stop is not None:
            self.on_stop(signum)
        if self._deferring:
            self._pending = True
            return
        raise StopRequested(signum)

    @contextlib.contextmanager
    def deferred(self):
        """A block that a stop signal does not interrupt; a signal that arrived during it raises
        :class:`StopRequested` when it ends (unless the block raised already)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise StopRequested(self.signum)


@contextlib.contextmanager
def stop_on_signals(on_stop=None):
    """Install :class:`StopSignals`' handler for :data:`STOP_SIGNALS` (main thread only) and
    restore the previous handlers on exit. Yields the :class:`StopSignals`."""
    state = StopSignals(on_stop)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.signal(s, state.handle) for s in STOP_SIGNALS}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Stopping:
    def __init__(self):
        self.value = False

    def set(self, value: bool) -> None:
        self.value = bool(value)


@contextlib.contextmanager
def ignoring_stop_signals():
    """For a process that ends when its run stops (``aam-func train``): stop signals are ignored
    outside :func:`stop_on_signals` (whose handlers take over inside it), and stay ignored after
    a stop (a KeyboardInterrupt, or ``.set(True)`` on the yielded flag), so that a second Ctrl-C
    cannot interrupt the exit with a traceback. Otherwise the previous handlers come back."""
    stopping = _Stopping()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield stopping
    except KeyboardInterrupt:
        stopping.set(True)
        raise
    finally:
        if not stopping.value:
            for s, h in previous.items():
                signal.signal(s, h)
