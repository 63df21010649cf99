"""The watcher's events: changes to kernels and sources, held until things are quiet.

A change is recorded as "this (what, name) was present, and now is or is not". Changes
are held until the recorder has been quiet for `debounce` seconds (at most
`debounce * 30` after the first change), then handed to the sink on the event loop, each
(kind, name) once, removals first. Something that came and went within one period is
not reported; something that went and came back (a kernel or a source reinstalled) is
reported removed, then added.

Recording and `activity()` may happen on any thread; delivery happens on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

_MAX_DELAY_FACTOR = 30


class EventKind(StrEnum):
    KERNEL_ADDED = "kernel-added"
    HEADERS_ARRIVED = "headers-arrived"
    KERNEL_REMOVED = "kernel-removed"
    SOURCE_ADDED = "source-added"
    SOURCE_REMOVED = "source-removed"


_ORDER = (
    EventKind.KERNEL_REMOVED,
    EventKind.SOURCE_REMOVED,
    EventKind.KERNEL_ADDED,
    EventKind.HEADERS_ARRIVED,
    EventKind.SOURCE_ADDED,
)


@dataclass(frozen=True)
class WatchEvent:
    kind: EventKind
    name: str  # KVER, or the source dir name "NAME-VERSION"


class What(StrEnum):
    """What can be present or not: a kernel, a kernel's headers, a source."""

    KERNEL = "kernel"
    HEADERS = "headers"
    SOURCE = "source"


Key = tuple[What, str]

_REPORTS: dict[What, tuple[EventKind | None, EventKind]] = {
    What.KERNEL: (EventKind.KERNEL_REMOVED, EventKind.KERNEL_ADDED),
    What.HEADERS: (None, EventKind.HEADERS_ARRIVED),
    What.SOURCE: (EventKind.SOURCE_REMOVED, EventKind.SOURCE_ADDED),
}


@dataclass
class _Change:
    before: bool
    now: bool
    went: bool = False
    came: bool = False


def _events(changes: dict[Key, _Change]) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    for (what, name), change in changes.items():
        removed, added = _REPORTS[what]
        if removed is not None and change.before and change.went:
            out.append(WatchEvent(removed, name))
        if change.now and change.came:
            out.append(WatchEvent(added, name))
    return sorted(out, key=lambda event: (_ORDER.index(event.kind), event.name))


class Debouncer:
    """Holds recorded changes until quiet, then delivers them to `sink` on `loop`."""

    def __init__(
        self,
        sink: Callable[[WatchEvent], None],
        *,
        loop: asyncio.AbstractEventLoop,
        debounce: float,
    ) -> None:
        self._sink = sink
        self._loop = loop
        self._debounce = debounce
        self._lock = threading.Lock()
        self._pending: dict[Key, _Change] = {}
        self._first_change = 0.0
        self._last_activity = 0.0
        self._armed = False
        self._stopping = False
        self._timer: asyncio.TimerHandle | None = None

    def activity(self) -> None:
        """Something happened that may still bring changes: the quiet period starts again."""
        with self._lock:
            self._last_activity = time.monotonic()

    def record(self, key: Key, was: bool, now: bool) -> None:
        """`key` went from present `was` to present `now`."""
        if now == was:
            return
        with self._lock:
            if not self._pending:
                self._first_change = time.monotonic()
            change = self._pending.setdefault(key, _Change(before=was, now=was))
            change.now = now
            change.came |= now
            change.went |= not now

    def arm(self) -> None:
        """Deliver the held changes once things are quiet (a no-op when none are held)."""
        with self._lock:
            if not self._pending or self._armed or self._stopping:
                return
            self._armed = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            self._loop.call_soon_threadsafe(self._flush)

    def stop(self) -> None:
        """Deliver nothing more; changes not yet delivered are dropped. Call on the loop."""
        with self._lock:
            self._stopping = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _flush(self) -> None:
        """On the loop: deliver the changes if things have been quiet long enough."""
        with self._lock:
            self._timer = None
            if self._stopping:
                return
            now = time.monotonic()
            due = min(
                self._last_activity + self._debounce,
                self._first_change + self._debounce * _MAX_DELAY_FACTOR,
            )
            if now < due:
                self._timer = self._loop.call_later(due - now, self._flush)
                return
            changes, self._pending, self._armed = self._pending, {}, False
        for event in _events(changes):
            self._loop.call_soon(self._sink, event)
