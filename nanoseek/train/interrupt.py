"""Ctrl-C for every training command: the first SIGINT asks the loop to stop after the current step (it saves a
checkpoint and the command exits 130); a second one interrupts at once."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """``with StopFlag() as stop: ... if stop.requested: save and leave``."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
