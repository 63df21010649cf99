"""Kernels and sources coming and going, from inotify (through watchdog), debounced.

Every watch is non-recursive: each modules dir (`kernel-added`/`kernel-removed`), each
`<modules dir>/KVER` (for its `build` link), `<root>/usr/src` and each dir in it (for
`dkms.conf`), and the headers dir each `build` leads to (for its `Module.symvers`; in
Debian that dir is in /usr/src, so already watched). kmodd's own writes below
`KVER/updates` are not seen at all, and depmod's `modules.*` cost a filtered event each,
never one of ours. A path that does not exist yet (a modules dir such as usr/lib/modules,
/usr/src, the dir a dangling `build` leads to) is waited for: its deepest existing
ancestor inside the root is watched for the next part of the path. Paths are resolved
inside the root (`Root.resolve`), so a merged-/usr root, where `lib/modules` and
`usr/lib/modules` are one dir, is watched once.

`headers-arrived` means a kernel's headers (`build`, and `Module.symvers` beside what it
leads to) became complete: the link appeared, or was pointed elsewhere, or the file
arrived; a new kernel that comes with its headers gets both `kernel-added` and
`headers-arrived`. A source dir losing its `dkms.conf` counts as removed.

Events are hints: each names a dir entry, which is looked at again (a stat or two) and
compared with what was known; the changes go to a `watch_events.Debouncer`, which hands
them to the sink on the event loop once the watched dirs have been quiet.

Threads: watchdog's emitters and dispatcher only queue events; one worker thread of ours
owns the state and the watches; the loop thread only takes the finished changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from watchdog.events import DirDeletedEvent, FileDeletedEvent, FileSystemEvent, FileSystemMovedEvent

from kmodd.base.log import get_logger
from kmodd.base.paths import Root, SymlinkLoopError
from kmodd.edges.dirwatch import DirWatches
from kmodd.edges.watch_events import Debouncer, Key, WatchEvent, What

log = get_logger(__name__)

_MAX_ROUNDS = 16
_SYMVERS = "Module.symvers"
_DKMS_CONF = "dkms.conf"


class _TopKind(StrEnum):
    MODULES = "modules"
    SOURCES = "sources"


@dataclass(frozen=True)
class _Kernel:
    kver: str
    kdir: Path  # resolved
    headers: Path | None = None  # where `build` leads, resolved
    ready: bool = False  # headers/Module.symvers is there


@dataclass(frozen=True)
class _Source:
    sdir: Path  # resolved
    conf: bool


# What a watched dir is watched for (one dir can be several of these).
@dataclass(frozen=True)
class _Top:
    path: Path


@dataclass(frozen=True)
class _KernelDir:
    key: Path  # <modules dir>/KVER


@dataclass(frozen=True)
class _SourceDir:
    name: str


@dataclass(frozen=True)
class _Await:
    names: frozenset[str]  # the next part of a path waited for


_Role = _Top | _KernelDir | _SourceDir | _Await
_STOP = object()


class Watcher:
    def __init__(
        self,
        root: Root,
        sink: Callable[[WatchEvent], None],
        *,
        loop: asyncio.AbstractEventLoop,
        debounce: float = 1.0,
    ) -> None:
        self._root = root
        self._changes = Debouncer(sink, loop=loop, debounce=debounce)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._watches = DirWatches(self._inbox)
        self._thread: threading.Thread | None = None
        # Owned by start(), then by the worker thread.
        self._tops: dict[Path, _TopKind] = {}
        self._kernels: dict[Path, _Kernel] = {}
        self._sources: dict[str, _Source] = {}
        self._roles: dict[Path, tuple[_Role, ...]] = {}
        self._recording = False

    # Life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch, and learn what is there now (reported as nothing: it is the start)."""
        self._watches.start()
        self._refresh_tops()
        self._settle()
        self._recording = True
        self._thread = threading.Thread(target=self._work, name="kmodd-watch", daemon=True)
        self._thread.start()
        log.debug("watching", dirs=len(self._watches), kernels=len(self._kernels))

    def stop(self) -> None:
        """Stop watching; changes not yet delivered are dropped. Call on the loop thread."""
        self._changes.stop()
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join()
            self._thread = None
        self._watches.stop()

    # Worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = [self._inbox.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1000:
                    batch.append(self._inbox.get_nowait())
            if _STOP in batch:
                return
            self._changes.activity()
            try:
                for item in batch:
                    if isinstance(item, FileSystemEvent):
                        self._handle(item)
                self._settle()
            except OSError as err:  # a race with the tree changing: the next event mends it
                log.warning("watch state not updated", error=str(err))
            self._changes.arm()

    def _handle(self, event: FileSystemEvent) -> None:
        moved = isinstance(event, FileSystemMovedEvent)
        went = moved or isinstance(event, FileDeletedEvent | DirDeletedEvent)
        hints = [(event.src_path, went)]
        if moved and event.dest_path:
            hints.append((event.dest_path, False))
        for raw, gone in hints:
            path = Path(os.fsdecode(raw))
            if gone and path in self._watches:
                # The dir itself went; its watch died with it, even if a new dir (maybe
                # with the same inode number) is there now. Watch again what is wanted.
                self._watches.discard(path)
                self._refresh_awaits()
            for role in self._roles.get(path.parent, ()):
                self._consider(role, path.name, gone=gone)

    def _consider(self, role: _Role, name: str, *, gone: bool) -> None:
        match role:
            case _Top(top):
                self._scan_entry(top, name, gone=gone)
            case _KernelDir(key) if name == "build":
                self._scan_build(key, gone=gone)
            case _SourceDir(source) if name == _DKMS_CONF:
                self._scan_conf(source, gone=gone)
            case _Await(names) if name in names:
                self._refresh_awaits()

    def _rescan(self, role: _Role) -> None:
        """A dir just got its watch: what happened in it before is read now."""
        match role:
            case _Top(top):
                self._scan_top(top)
            case _KernelDir(key):
                self._scan_build(key, gone=False)
            case _SourceDir(source):
                self._scan_conf(source, gone=False)
            case _Await():
                self._refresh_awaits()

    # State --------------------------------------------------------------------------

    def _present(self, what: What, name: str) -> bool:
        if what is What.SOURCE:
            source = self._sources.get(name)
            return source is not None and source.conf
        kernels = (k for k in self._kernels.values() if k.kver == name)
        return any(k.ready or what is What.KERNEL for k in kernels)

    @contextlib.contextmanager
    def _tracking(self, *keys: Key) -> Iterator[None]:
        before = {key: self._present(*key) for key in keys}
        yield
        if self._recording:
            for key, was in before.items():
                self._changes.record(key, was, self._present(*key))

    def _refresh_tops(self) -> None:
        wanted: dict[Path, _TopKind] = {}
        for path, kind in [(p, _TopKind.MODULES) for p in self._root.modules_dirs] + [
            (self._root.usr_src, _TopKind.SOURCES)
        ]:
            top = self._inside(path)
            if top is not None:
                wanted.setdefault(top, kind)
        wanted = {path: kind for path, kind in wanted.items() if path.is_dir()}
        for top, kind in list(self._tops.items()):
            if wanted.get(top) is kind:
                continue
            del self._tops[top]
            for key in [key for key in self._kernels if key.parent == top]:
                with self._tracking((What.KERNEL, key.name), (What.HEADERS, key.name)):
                    del self._kernels[key]
            if kind is _TopKind.SOURCES:
                for name in list(self._sources):
                    with self._tracking((What.SOURCE, name)):
                        del self._sources[name]
        for top, kind in wanted.items():
            if top not in self._tops:
                self._tops[top] = kind
                self._scan_top(top)

    def _scan_top(self, top: Path) -> None:
        try:
            with os.scandir(top) as entries:
                names = {entry.name for entry in entries}
        except OSError:
            names = set()
        if self._tops.get(top) is _TopKind.MODULES:
            names |= {key.name for key in self._kernels if key.parent == top}
        else:
            names |= set(self._sources)
        for name in sorted(names):
            self._scan_entry(top, name, gone=False)

    def _scan_entry(self, top: Path, name: str, *, gone: bool) -> None:
        kind = self._tops.get(top)
        if kind is _TopKind.MODULES:
            self._scan_kernel(top / name, gone=gone)
        elif kind is _TopKind.SOURCES:
            self._scan_source(top, name, gone=gone)

    def _scan_kernel(self, key: Path, *, gone: bool) -> None:
        kver = key.name
        keys = (What.KERNEL, kver), (What.HEADERS, kver)
        if gone:  # it went, whatever is there now (a reinstall is a removal and an add)
            with self._tracking(*keys):
                self._kernels.pop(key, None)
        with self._tracking(*keys):
            kdir = self._inside(key)
            if kdir is None or not kdir.is_dir():
                self._kernels.pop(key, None)
                return
            old = self._kernels.get(key)
            if old is None or old.kdir != kdir:
                self._kernels[key] = self._read_build(_Kernel(kver, kdir))

    def _scan_build(self, key: Path, *, gone: bool) -> None:
        kernel = self._kernels.get(key)
        if kernel is None:
            return
        new = self._read_build(kernel)
        if gone or kernel.headers not in (None, new.headers):  # went, or now leads elsewhere
            with self._tracking((What.HEADERS, kernel.kver)):
                self._kernels[key] = replace(kernel, headers=None, ready=False)
        with self._tracking((What.HEADERS, kernel.kver)):
            self._kernels[key] = new

    def _read_build(self, kernel: _Kernel) -> _Kernel:
        build = kernel.kdir / "build"
        if not build.is_symlink() and not build.exists():
            return replace(kernel, headers=None, ready=False)
        headers = self._inside(build)
        symvers = None if headers is None else self._inside(headers / _SYMVERS)
        return replace(kernel, headers=headers, ready=symvers is not None and symvers.is_file())

    def _scan_source(self, top: Path, name: str, *, gone: bool) -> None:
        if gone:
            with self._tracking((What.SOURCE, name)):
                self._sources.pop(name, None)
        with self._tracking((What.SOURCE, name)):
            sdir = self._inside(top / name)
            if sdir is None or not sdir.is_dir():
                self._sources.pop(name, None)
                return
            old = self._sources.get(name)
            if old is None or old.sdir != sdir:
                self._sources[name] = _Source(sdir, self._has_conf(sdir))

    def _scan_conf(self, name: str, *, gone: bool) -> None:
        source = self._sources.get(name)
        if source is None:
            return
        if gone:
            with self._tracking((What.SOURCE, name)):
                self._sources[name] = replace(source, conf=False)
        with self._tracking((What.SOURCE, name)):
            self._sources[name] = replace(source, conf=self._has_conf(source.sdir))

    def _has_conf(self, sdir: Path) -> bool:
        conf = self._inside(sdir / _DKMS_CONF)
        return conf is not None and conf.is_file()

    def _inside(self, path: Path) -> Path | None:
        """`path` resolved inside the root; None for a symlink loop (not there)."""
        try:
            return self._root.resolve(path)
        except SymlinkLoopError:
            return None

    def _refresh_awaits(self) -> None:
        self._refresh_tops()
        for key, kernel in list(self._kernels.items()):
            if kernel.headers is not None:
                self._scan_build(key, gone=False)

    # Watches ------------------------------------------------------------------------

    def _desired(self) -> dict[Path, tuple[_Role, ...]]:
        want: dict[Path, list[_Role]] = {}
        for top in self._tops:
            want.setdefault(top, []).append(_Top(top))
        for key, kernel in self._kernels.items():
            want.setdefault(kernel.kdir, []).append(_KernelDir(key))
        for name, source in self._sources.items():
            want.setdefault(source.sdir, []).append(_SourceDir(name))
        targets = [
            self._root.resolve(path) for path in (*self._root.modules_dirs, self._root.usr_src)
        ]
        targets = [path for path in targets if path not in self._tops]
        targets += [k.headers / _SYMVERS for k in self._kernels.values() if k.headers]
        awaited: dict[Path, set[str]] = {}
        for target in targets:
            found = self._nearest_dir(target)
            if found is not None:
                awaited.setdefault(found[0], set()).add(found[1])
        for path, names in awaited.items():
            want.setdefault(path, []).append(_Await(frozenset(names)))
        return {path: tuple(roles) for path, roles in want.items()}

    def _nearest_dir(self, target: Path) -> tuple[Path, str] | None:
        """The deepest existing dir above `target` inside the root, and the next part."""
        child = target
        for parent in target.parents:
            if not parent.is_relative_to(self._root.prefix):
                return None
            if parent.is_dir() and not parent.is_symlink():
                return parent, child.name
            child = parent
        return None

    def _settle(self) -> None:
        """Make the watches match the state; a new watch's dir is read again after."""
        for _ in range(_MAX_ROUNDS):
            want = self._desired()
            for path in [path for path in self._watches if path not in want]:
                self._watches.discard(path)
            fresh = [path for path in want if path not in self._watches and self._watches.add(path)]
            self._roles = {path: roles for path, roles in want.items() if path in self._watches}
            if not fresh:
                return
            for path in fresh:
                for role in want[path]:
                    self._rescan(role)
        log.warning("watches did not settle", rounds=_MAX_ROUNDS)
