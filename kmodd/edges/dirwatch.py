"""Non-recursive inotify watches on a set of dirs, through watchdog.

Only entries appearing, disappearing and moving are noticed (no IN_MODIFY, IN_ATTRIB,
IN_CLOSE_*); each is put, as watchdog's event, on the queue given. A dir that cannot be
watched is said once (unless it is merely gone) and left out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
from collections.abc import Iterator
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from kmodd.base.log import get_logger

log = get_logger(__name__)

_NOTICED: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]


class _Forward(FileSystemEventHandler):
    def __init__(self, inbox: queue.SimpleQueue[object]) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._inbox.put(event)


class DirWatches:
    """The dirs watched now. Not thread-safe: one thread adds and discards."""

    def __init__(self, inbox: queue.SimpleQueue[object]) -> None:
        self._forward = _Forward(inbox)
        self._observer: InotifyObserver | None = None
        self._watches: dict[Path, ObservedWatch] = {}
        self._failed: set[Path] = set()

    def start(self) -> None:
        if self._observer is not None:
            raise RuntimeError("dir watches already started")
        self._observer = InotifyObserver()
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None and self._observer.is_alive():
            self._observer.stop()
            self._observer.join()

    def __contains__(self, path: Path) -> bool:
        return path in self._watches

    def __iter__(self) -> Iterator[Path]:
        return iter(list(self._watches))

    def __len__(self) -> int:
        return len(self._watches)

    def add(self, path: Path) -> bool:
        """Watch `path`; False when it cannot be (it is gone, or the watch limit is hit)."""
        assert self._observer is not None, "start() first"
        try:
            watch = self._observer.schedule(
                self._forward, os.fspath(path), recursive=False, event_filter=_NOTICED
            )
        except OSError as err:
            if err.errno != errno.ENOENT and path not in self._failed:
                log.warning("cannot watch", path=os.fspath(path), error=str(err))
            self._failed.add(path)
            return False
        self._failed.discard(path)
        self._watches[path] = watch
        return True

    def discard(self, path: Path) -> None:
        assert self._observer is not None, "start() first"
        watch = self._watches.pop(path)
        with contextlib.suppress(KeyError):  # its dir went, and the watch with it
            self._observer.unschedule(watch)
