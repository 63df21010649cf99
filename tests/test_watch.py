"""The watcher on real inotify in a temporary root, with a real asyncio loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from kmodd.base.paths import Root
from kmodd.edges.watch import Watcher
from kmodd.edges.watch_events import EventKind, WatchEvent

DEBOUNCE = 0.3
QUIET = DEBOUNCE + 0.1  # after the expected events: long enough for one more to show
NOTHING = 2 * DEBOUNCE + 0.2  # when none is expected: long enough for a late one to show
K = "6.12.113+deb12-amd64"
SYMVERS = "0x12345678\tprintk\tvmlinux\tEXPORT_SYMBOL\n"


@dataclass
class Session:
    seen: list[WatchEvent] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # when each was delivered
    threads: set[int] = field(default_factory=set)
    acted: float = 0.0  # when the last step touched the tree

    def act(self) -> None:
        self.acted = time.monotonic()

    async def until(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @property
    def pairs(self) -> list[tuple[EventKind, str]]:
        return [(event.kind, event.name) for event in self.seen]


def watching(root: Path, steps: Callable[[Session], Awaitable[None]], *, expect: int) -> Session:
    """Watch `root`, run `steps`, wait for `expect` events and then for any more."""

    async def main() -> Session:
        session = Session()

        def sink(event: WatchEvent) -> None:
            session.seen.append(event)
            session.at.append(time.monotonic())
            session.threads.add(threading.get_ident())

        loop = asyncio.get_running_loop()
        watcher = Watcher(Root.at(root), sink, loop=loop, debounce=DEBOUNCE)
        watcher.start()
        try:
            await steps(session)
            await session.until(expect)
            await asyncio.sleep(QUIET if expect else NOTHING)
        finally:
            watcher.stop()
        return session

    session = asyncio.run(main())
    assert session.threads <= {threading.get_ident()}, "the sink ran off the loop thread"
    return session


def inotify_watches() -> int:
    """How many inotify watches this process holds, as the kernel counts them."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.fspath(fd.readlink()) != "anon_inode:inotify":
                continue
            info = (Path("/proc/self/fdinfo") / fd.name).read_text()
        except OSError:
            continue
        count += sum(line.startswith("inotify wd:") for line in info.splitlines())
    return count


def make_root(tmp_path: Path) -> Path:
    (tmp_path / "lib/modules").mkdir(parents=True)
    (tmp_path / "usr/src").mkdir(parents=True)
    return tmp_path


def add_headers(root: Path, kver: str, *, symvers: bool = True) -> Path:
    headers = root / f"usr/src/linux-headers-{kver}"
    (headers / "include/linux").mkdir(parents=True)
    (headers / "Makefile").write_text("")
    if symvers:
        (headers / "Module.symvers").write_text(SYMVERS)
    return headers


def add_kernel(root: Path, kver: str, *, build: bool = False) -> Path:
    kdir = root / "lib/modules" / kver
    (kdir / "kernel/drivers").mkdir(parents=True)
    (kdir / "modules.dep").write_text("")
    if build:
        (kdir / "build").symlink_to(f"/usr/src/linux-headers-{kver}")
    return kdir


def add_source(root: Path, name: str) -> Path:
    sdir = root / "usr/src" / name
    sdir.mkdir()
    (sdir / "dkms.conf").write_text(f'PACKAGE_NAME="{name}"\n')
    (sdir / "main.c").write_text("")
    return sdir


# Kernels -----------------------------------------------------------------------------


def test_a_new_kernel_dir_is_reported_once_when_it_has_settled(tmp_path: Path) -> None:
    root = make_root(tmp_path)

    async def steps(session: Session) -> None:
        kdir = root / "lib/modules" / K
        kdir.mkdir()
        for name in ("kernel", "modules.order", "modules.builtin", "modules.dep"):
            await asyncio.sleep(DEBOUNCE / 3)  # the dir fills, never quiet for long
            (kdir / name).touch()
        session.act()

    session = watching(root, steps, expect=1)
    assert session.pairs == [(EventKind.KERNEL_ADDED, K)]
    assert DEBOUNCE <= session.at[0] - session.acted < DEBOUNCE + 1.0


def test_a_build_link_appearing_later_means_headers_arrived(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    kdir = add_kernel(root, K)
    add_headers(root, K)

    async def steps(session: Session) -> None:
        (kdir / "build").symlink_to(f"/usr/src/linux-headers-{K}")

    assert watching(root, steps, expect=1).pairs == [(EventKind.HEADERS_ARRIVED, K)]


def test_headers_without_module_symvers_arrive_when_it_does(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    add_kernel(root, K, build=True)
    headers = add_headers(root, K, symvers=False)

    async def steps(session: Session) -> None:
        (headers / "scripts").mkdir()
        (headers / ".config").write_text("")
        await asyncio.sleep(DEBOUNCE + 0.1)
        assert session.seen == [], "headers without Module.symvers are not headers yet"
        (headers / "Module.symvers").write_text(SYMVERS)

    assert watching(root, steps, expect=1).pairs == [(EventKind.HEADERS_ARRIVED, K)]


def test_a_dangling_build_link_waits_for_the_headers_tree(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    add_kernel(root, K, build=True)  # linux-headers-K is not there at all yet

    async def steps(session: Session) -> None:
        headers = add_headers(root, K, symvers=False)
        for i in range(200):
            (headers / "include/linux" / f"h{i}.h").write_text("")
        staged = headers / "Module.symvers.dpkg-new"  # as dpkg unpacks: write, then rename
        staged.write_text(SYMVERS)
        staged.rename(headers / "Module.symvers")

    assert watching(root, steps, expect=1).pairs == [(EventKind.HEADERS_ARRIVED, K)]


def test_headers_removed_and_unpacked_again_arrive_again(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    add_kernel(root, K, build=True)
    headers = add_headers(root, K)

    async def steps(session: Session) -> None:
        shutil.rmtree(headers)  # the build link stays, dangling
        await asyncio.sleep(DEBOUNCE + 0.1)
        add_headers(root, K)

    assert watching(root, steps, expect=1).pairs == [(EventKind.HEADERS_ARRIVED, K)]


def test_rm_r_of_a_kernel_dir_is_kernel_removed(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    kdir = add_kernel(root, K, build=True)
    add_headers(root, K)
    (kdir / "updates/dkms").mkdir(parents=True)
    (kdir / "updates/dkms/hello.ko").write_bytes(b"\x7fELF")

    async def steps(session: Session) -> None:
        shutil.rmtree(kdir)

    assert watching(root, steps, expect=1).pairs == [(EventKind.KERNEL_REMOVED, K)]


def test_kmodds_own_writes_and_depmod_make_no_event(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    kdir = add_kernel(root, K, build=True)
    add_headers(root, K)
    add_source(root, "hello-1.0")
    for i in range(100):
        (kdir / f"kernel/drivers/d{i}/sub").mkdir(parents=True)

    async def steps(session: Session) -> None:
        # lib/modules, K, usr/src, hello-1.0, linux-headers-K, usr (for usr/lib/modules)
        assert inotify_watches() == 6, "only the dirs that matter are watched, none below"
        dkms = kdir / "updates/dkms"
        dkms.mkdir(parents=True)
        for i in range(500):
            (dkms / f"m{i}.ko.xz").write_bytes(b"x")
        for name in ("modules.dep", "modules.dep.bin", "modules.alias", "modules.symbols"):
            tmp = kdir / f"{name}.tmp"  # as depmod writes them
            tmp.write_text("updates/dkms/m0.ko.xz:\n")
            tmp.rename(kdir / name)
        (dkms / "m0.ko.xz").unlink()

    assert watching(root, steps, expect=0).seen == []


def test_a_modules_dir_created_after_start_is_watched(tmp_path: Path) -> None:
    root = make_root(tmp_path)  # no usr/lib at all: its nearest ancestor (usr) is watched

    async def steps(session: Session) -> None:
        (root / "usr/lib/modules" / K / "kernel").mkdir(parents=True)

    assert watching(root, steps, expect=1).pairs == [(EventKind.KERNEL_ADDED, K)]


# Sources -----------------------------------------------------------------------------


def test_a_source_dir_with_dkms_conf_is_source_added(tmp_path: Path) -> None:
    root = make_root(tmp_path)

    async def steps(session: Session) -> None:
        add_source(root, "hello-1.0")
        (root / "usr/src/not-a-source").mkdir()

    assert watching(root, steps, expect=1).pairs == [(EventKind.SOURCE_ADDED, "hello-1.0")]


def test_dkms_conf_moved_into_an_empty_source_dir_later(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    staged = root / "staging/dkms.conf"
    staged.parent.mkdir()
    staged.write_text('PACKAGE_NAME="hello"\n')

    async def steps(session: Session) -> None:
        (root / "usr/src/hello-1.0").mkdir()
        await asyncio.sleep(DEBOUNCE + 0.1)
        assert session.seen == [], "a dir without dkms.conf is no source"
        staged.rename(root / "usr/src/hello-1.0/dkms.conf")

    session = watching(root, steps, expect=1)
    assert session.pairs == [(EventKind.SOURCE_ADDED, "hello-1.0")]


def test_rm_r_of_a_source_is_source_removed(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    sdir = add_source(root, "hello-1.0")
    (root / "usr/src/plain").mkdir()  # never had a dkms.conf: its going is no event

    async def steps(session: Session) -> None:
        shutil.rmtree(sdir)
        (root / "usr/src/plain").rmdir()

    session = watching(root, steps, expect=1)
    assert session.pairs == [(EventKind.SOURCE_REMOVED, "hello-1.0")]


# Debouncing --------------------------------------------------------------------------


def test_what_comes_and_goes_within_the_debounce_is_not_reported(tmp_path: Path) -> None:
    root = make_root(tmp_path)

    async def steps(session: Session) -> None:
        (root / "lib/modules/flicker").mkdir()
        (root / "lib/modules/flicker").rmdir()
        shutil.rmtree(add_source(root, "flicker-1.0"))

    assert watching(root, steps, expect=0).seen == []


def test_one_quiet_period_is_delivered_in_a_stable_order(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    add_kernel(root, "old")
    add_kernel(root, "re")
    add_source(root, "gone-1.0")
    add_headers(root, K)

    async def steps(session: Session) -> None:
        add_source(root, "new-1.0")
        add_kernel(root, K, build=True)
        shutil.rmtree(root / "usr/src/gone-1.0")
        shutil.rmtree(root / "lib/modules/old")
        shutil.rmtree(root / "lib/modules/re")  # a kernel reinstalled: removed, then added
        add_kernel(root, "re")

    assert watching(root, steps, expect=7).pairs == [
        (EventKind.KERNEL_REMOVED, "old"),
        (EventKind.KERNEL_REMOVED, "re"),
        (EventKind.SOURCE_REMOVED, "gone-1.0"),
        (EventKind.KERNEL_ADDED, K),
        (EventKind.KERNEL_ADDED, "re"),
        (EventKind.HEADERS_ARRIVED, K),
        (EventKind.SOURCE_ADDED, "new-1.0"),
    ]
