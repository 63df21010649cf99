"""The reads anyone may ask the service for, Status and Plan, answered from a cache.

An answer is kept while what it is made of is unchanged: no job changed anything (the
service's generation), and cheap stats of the files it reads say the same (the
sources' dkms.conf files, kmodd's state, the kernels' trees kmodd writes, the overrides
and settings, the kernel's exports). A Status answer is also made again once it is a
few seconds old, for what no stat shows (a module loaded meanwhile). One caller
computes while the others wait for its answer: a crowd of callers costs one
computation, never one each (and never one dkms.conf evaluation per Plan call).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from kmodd.base.errors import KmoddError
from kmodd.base.paths import Root, SymlinkLoopError
from kmodd.world import kernel

T = TypeVar("T")
Stamp = tuple[int, int] | None

STATUS_MAX_AGE = 2.0
"""Seconds a Status answer is kept at most, whatever the stats say."""
_TREES = ("updates", "extra", "weak-updates")


class Cached(Generic[T]):
    """One cached value per key (a kernel, or all), made again when its inputs change."""

    def __init__(self, max_age: float | None = None) -> None:
        self._held: dict[str, tuple[object, float, T]] = {}
        self._lock = threading.Lock()
        self._max_age = max_age

    def get(self, key: str, inputs: Callable[[], object], make: Callable[[], T]) -> T:
        with self._lock:
            now_inputs = inputs()
            held = self._held.get(key)
            fresh = self._max_age is None or (
                held is not None and time.monotonic() - held[1] < self._max_age
            )
            if held is not None and held[0] == now_inputs and fresh:
                return held[2]
            value = make()
            self._held[key] = (now_inputs, time.monotonic(), value)
            return value


def stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _sources(root: Root) -> tuple[tuple[str, Stamp], ...]:
    base = root.usr_src
    if not base.is_dir():
        return ()
    return tuple((e.name, stamp(e / "dkms.conf")) for e in sorted(base.iterdir()))


def plan_inputs(root: Root, release: str) -> tuple[object, ...]:
    """What a plan for `release` is made of: each source's dkms.conf, the overrides,
    kmodd's settings, the kernel's exports and its modules dir."""
    moddir = root.path(f"/lib/modules/{release}")
    try:
        symvers = stamp(root.resolve(moddir / "build") / "Module.symvers")
    except SymlinkLoopError:
        symvers = None
    return (
        _sources(root),
        stamp(root.dkms_overrides),
        stamp(root.config_file),
        stamp(moddir),
        symvers,
    )


def status_inputs(root: Root) -> tuple[object, ...]:
    """What Status is made of: the sources, kmodd's state (its database and log), the
    kernels and every directory of the trees kmodd writes in each, the settings."""
    state = root.state_dir / "state.db"
    trees = tuple(_tree_stamps(root))
    return (_sources(root), stamp(state), stamp(Path(f"{state}-wal")), trees,
            stamp(root.config_file))  # fmt: skip


def _tree_stamps(root: Root) -> Iterator[tuple[str, Stamp]]:
    for base in root.modules_dirs:
        yield (str(base), stamp(base))
    for release in kernel.installed_releases(root):
        try:
            k = kernel.find(root, release)
        except KmoddError:  # gone meanwhile: the next stats say so
            continue
        for tree in _TREES:
            top = k.modules_dir / tree
            if top.is_dir() and not top.is_symlink():
                yield (str(top), stamp(top))
                for sub in sorted(top.iterdir()):
                    if sub.is_dir() and not sub.is_symlink():
                        yield (str(sub), stamp(sub))
