"""Running one kernel's builds: in BUILD_DEPENDS order (graphlib), each holding a token
of kmodd's one jobserver while it runs, the most urgent of those ready first.

A build starts as soon as it is ready and a token is free, so builds run in parallel
across sources (and, in the service, across kernels: the jobserver is the service's),
and a long build takes every token the others give back. A cycle fails its members,
named; what needs a failed source fails too; the rest go on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Protocol

from kmodd.act.builder import BuildResult
from kmodd.base.errors import CancelledError
from kmodd.base.jobserver import Jobserver
from kmodd.decide.plan import Decision

_POLL = 0.1
"""How often a ready build looks for a free token while the tokens are elsewhere."""


class Builds(Protocol):
    """What the caller does for each build (autoinstall's run for a kernel)."""

    def started(self, d: Decision) -> None:
        """Before a build starts, in the scheduling thread (records it `building`)."""

    def build(self, d: Decision) -> BuildResult:
        """The build itself, in a worker thread, holding its token."""
        ...

    def finish(self, d: Decision, future: Future[BuildResult]) -> bool:
        """After a build, in the scheduling thread: False when it failed (what needs it
        fails too)."""
        ...

    def failed(self, d: Decision, problem: str) -> None:
        """A build that never started: a BUILD_DEPENDS cycle, or a dependency failed."""

    def restore(self, d: Decision) -> None:
        """A build that was cancelled: its record as it was before."""


def run(
    builds: Sequence[Decision],
    handler: Builds,
    jobserver: Jobserver,
    *,
    urgency: Callable[[Decision], tuple[object, ...]],
    cancel: threading.Event | None = None,
) -> bool:
    """Run `builds`; True when they were cancelled (the unfinished ones restored)."""
    by_name = {d.name: d for d in builds}
    graph = {d.name: set(_depends(d)) & by_name.keys() for d in builds}
    failed: set[str] = set()
    for cycle in _break_cycles(graph):
        for name in dict.fromkeys(cycle):
            failed.add(name)
            handler.failed(by_name[name], f"BUILD_DEPENDS cycle: {' -> '.join(cycle)}")
    order = TopologicalSorter(graph)
    order.prepare()
    ready: list[Decision] = []
    running: dict[Future[BuildResult], Decision] = {}
    stopped = False
    with ThreadPoolExecutor(max_workers=jobserver.tokens, thread_name_prefix="build") as pool:
        while order.is_active() and not stopped:
            for name in order.get_ready():
                d = by_name[name]
                blocked = [dep for dep in _depends(d) if dep in failed]
                if blocked:
                    failed.add(d.name)
                    handler.failed(d, f"BUILD_DEPENDS {', '.join(blocked)} failed")
                    order.done(d.name)
                else:
                    ready.append(d)
            ready.sort(key=urgency)
            while ready and not _set(cancel) and jobserver.try_acquire():
                d = ready.pop(0)
                handler.started(d)
                running[pool.submit(handler.build, d)] = d
            if _set(cancel):
                stopped = True
            elif not running:
                if ready:  # every token is busy with another kernel's builds
                    jobserver.wait_for_token(_POLL)
                continue  # or only failures were ready: what they unblocked is next
            done, _ = wait(running, timeout=_POLL if ready else None, return_when=FIRST_COMPLETED)
            for future in done:
                jobserver.release()
                d = running.pop(future)
                if isinstance(future.exception(), CancelledError):
                    stopped = True
                    handler.restore(d)
                    continue
                if not handler.finish(d, future):
                    failed.add(d.name)
                order.done(d.name)
        for future, d in running.items():  # cancelled too: their commands are killed
            error = future.exception()
            jobserver.release()
            if isinstance(error, CancelledError):
                handler.restore(d)
            else:
                handler.finish(d, future)
    return stopped or _set(cancel)


SOURCE_BYTES_PER_SECOND = 25_000
"""For a source never built here: how long its build is guessed to take, from its size.
Crude (measured on Debian's `*-dkms` sources, 2 CPUs: openafs, 8 MB, ~300 s; dahdi,
6 MB, ~40 s; jool, 1 MB, ~30 s; most under 200 kB, under 5 s), but it starts the few
long builds first, as their recorded durations do from the next kernel on."""


def estimate(source: Path) -> float:
    """Seconds a first build of the source in `source` is guessed to take."""
    size = 0
    for parent, _dirs, files in os.walk(source):
        for name in files:
            with contextlib.suppress(OSError):
                size += Path(parent, name).lstat().st_size
    return size / SOURCE_BYTES_PER_SECOND


def _set(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _depends(d: Decision) -> tuple[str, ...]:
    return d.conf.build_depends if d.conf else ()


def _break_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Take every BUILD_DEPENDS cycle out of `graph` (name -> the names it needs), with
    its members wherever they are needed; returns the cycles, each as graphlib names it
    (`a, b, a`), so each can fail with its cycle named."""
    cycles = []
    while True:
        try:
            TopologicalSorter(graph).prepare()
        except CycleError as err:
            cycle = [str(name) for name in err.args[1]]
            cycles.append(cycle)
            for name in cycle:
                graph.pop(name, None)
            for needs in graph.values():
                needs.difference_update(cycle)
        else:
            return cycles
