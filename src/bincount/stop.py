"""SIGTERM (and SIGINT) as a stop: an exception in the main thread, so that every ``finally`` runs
(Python's default SIGTERM action ends the process at once, leaving temporary files behind).
:func:`stops_held` marks code a stop must not cut in two: a SIGTERM there is raised when it ends.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stopped(BaseException):
    """Raised in the main thread by a SIGTERM (or SIGINT) under :func:`stop_on_sigterm`; a
    ``BaseException``, as ``KeyboardInterrupt`` is, so no ``except Exception`` swallows it.

    Attributes:
        signum: The signal that stopped the process.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Stop:
    """The SIGTERM handler of :func:`stop_on_sigterm`."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.held = 0  # depth of stops_held blocks
        self.pending: int | None = None  # the signal that arrived while held
        self.received: int | None = None  # the first signal that arrived in the block

    def __call__(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked child before it sets its own handler: its parent stops it
            return
        if self.received is None:
            self.received = signum
        if self.held:
            self.pending = signum
            return
        raise Stopped(signum)


_active: _Stop | None = None


@contextmanager
def stop_on_sigterm(*, sigint: bool = False) -> Iterator[_Stop]:
    """While in the block, SIGTERM raises :class:`Stopped` in the main thread; the previous handler is
    put back after. Outside the main thread (where Python cannot set signal handlers) it does nothing.

    Args:
        sigint: SIGINT (Ctrl-C) raises :class:`Stopped` too, instead of ``KeyboardInterrupt``
            (which Lightning catches and turns into an exit of its own).

    Yields:
        The handler; its ``received`` is the first signal that arrived (``None``: none yet).

    Raises:
        Stopped: When the process receives SIGTERM (or SIGINT) in the block.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield _Stop()
        return
    outer, _active = _active, _Stop()
    signums = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    previous = {signum: signal.signal(signum, _active) for signum in signums}
    try:
        yield _active
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _active = outer


@contextmanager
def stops_held() -> Iterator[None]:
    """A SIGTERM in the block is raised as :class:`Stopped` when the block ends, not in it.

    For forking worker processes (an exception raised in a fork's callbacks is printed and lost)
    or building the object that later shuts them down. An error the block raises after a SIGTERM
    gives way to :class:`Stopped`. Without :func:`stop_on_sigterm` around it, it does nothing.

    Raises:
        Stopped: When the process received SIGTERM in the block.
    """
    stop = _active
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop.held += 1
    try:
        yield
    finally:
        stop.held -= 1
        if not stop.held and stop.pending is not None:
            signum, stop.pending = stop.pending, None
            raise Stopped(signum)  # the stop wins over an error it caused
