"""Ctrl-C, SIGINT and SIGTERM during training: the first asks the loop to stop after the current step and save a
checkpoint; a second one exits at once (an unfinished save is removed at the next start)."""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into `self.signum` instead of an exception.

    Handlers are installed only in the main thread (Python delivers signals there); outside it, nothing changes.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            _say(f"rlkit: {name} again: exiting now, without a checkpoint for the current step")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"rlkit: {name}: stopping after the current step and saving a checkpoint "
             f"(press Ctrl-C again to exit at once)")


def _say(line: str) -> None:
    """One line to stderr, written directly: safe however the interrupted code was using sys.stderr."""
    os.write(2, (line + "\n").encode())
