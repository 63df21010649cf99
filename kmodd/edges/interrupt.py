"""SIGINT, SIGTERM and SIGHUP to kmodctl: while in-process work runs, they stop it
through `INTERRUPTED` (its builds' process groups are killed, each source left as it
was); otherwise they end kmodctl at once."""

from __future__ import annotations

import signal
import threading

INTERRUPTED = threading.Event()
"""Set by a signal: in-process builds stop (their commands are killed)."""
SIGNALS: list[int] = []
"""The signals received, first first: kmodctl exits 128 + the first."""
_working = threading.Event()


def install() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def working() -> None:
    """In-process work runs from now on: a signal stops it, not by raising."""
    _working.set()


def _on_signal(signum: int, frame: object) -> None:
    SIGNALS.append(signum)
    INTERRUPTED.set()
    if not _working.is_set():
        raise KeyboardInterrupt
