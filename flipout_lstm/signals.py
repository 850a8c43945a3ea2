"""SIGINT/SIGTERM during training: finish the step, save, exit 0; a second signal stops at once.

train.py installs a :class:`StopSignal` for the whole run and checks ``stop.signum`` after each
step; under DDP (flipout_lstm.distributed.AgreedStop) the ranks agree on it so that every rank stops after
the same step. Checkpoint writes run inside :meth:`StopSignal.deferred`, so the newest
checkpoint is always whole.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: leave at once. main() turns it into one line and exit 128+N.
    (A KeyboardInterrupt, so that no ``except Exception`` on the way swallows it.)"""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step.

    The first signal says at once that the run stops after the current step and saves. A
    second one stops at once (:class:`StopNow`), except while a checkpoint is being written
    (:meth:`deferred`): that write finishes first, so the newest checkpoint is always whole.
    """

    def __init__(self):
        self.signum = None
        self.again = None  # a second signal that arrived during a deferred block
        self.depth = 0
        self.explain = lambda: "nothing had been written yet"  # train() says more once it can

    def __call__(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            again = "press Ctrl-C again to stop" if signum == signal.SIGINT else f"a second {name} stops"
            self._say(f"\n{name} received: stopping after the current step and saving a "
                      f"checkpoint ({again} at once, losing the steps since the last checkpoint)\n")
        elif self.depth:
            self.again = signum
        else:
            raise StopNow(signum)

    @staticmethod
    def _say(text: str) -> None:
        """Print from a signal handler: a raw write, since the handler may interrupt a print."""
        try:
            os.write(sys.stderr.fileno(), text.encode())
        except (AttributeError, OSError, ValueError):  # no file descriptor (captured stderr)
            print(text, end="", file=sys.stderr)

    @contextlib.contextmanager
    def deferred(self):
        """A second signal inside this block takes effect when the block ends."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.again is not None:
            raise StopNow(self.again)

    @contextlib.contextmanager
    def installed(self):
        """Catch SIGINT/SIGTERM while training; put the previous handlers back afterwards."""
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
