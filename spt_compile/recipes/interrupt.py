"""Stopping a training loop on Ctrl-C or SIGTERM without losing the steps since the last checkpoint.

A signal that arrives mid-step would otherwise drop every step since the last scheduled checkpoint
(up to --save-every of them). Inside `StopAtStepEnd`, the first SIGINT or SIGTERM only sets
`requested`: the loop finishes the step in flight, saves, and stops. A second signal stops at once
(KeyboardInterrupt), for a step that hangs. Job schedulers send SIGTERM before they kill, so a
preempted run keeps its last step too, if the step ends within their grace period.

    with StopAtStepEnd() as stop:
        while step < steps:
            ...one step...
            if step % save_every == 0 or stop.requested:
                save(...)
            if stop.requested:
                raise Interrupted(stop.requested, f"stopped after step {step}; ...")
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal after saving; main() prints the message and exits 128 + the signal's
    number, as a shell reports a process a signal ended."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


class StopAtStepEnd:
    """While active, the first SIGINT / SIGTERM sets `requested` (the signal's name) instead of stopping;
    the next one raises KeyboardInterrupt. The handlers before it come back on exit. Outside the main
    thread (where Python cannot install handlers) it does nothing: signals act as they did."""

    def __init__(self, signals: tuple = STOP_SIGNALS):
        self.signals = signals
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopAtStepEnd":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt(f"{name} again while finishing the step")
        self.requested = name
        print(f"\n{name}: finishing this step, then saving a checkpoint and stopping "
              "(send it again to stop at once, losing the steps since the last checkpoint)",
              file=sys.stderr, flush=True)
