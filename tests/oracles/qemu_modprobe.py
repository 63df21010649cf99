"""Boot a real kernel under QEMU (TCG) and load modules with `modprobe`, as the booted
system would: the load-time oracle for a whole installed modules tree.

The guest runs a tiny initramfs: a static busybox, /init, and under
``/lib/modules/KVER/`` the tree's own ``modules.dep`` plus every module file the
requested modules need according to it, each at the path modules.dep names (so the file
needs no rewriting). A symlink in the tree (a weak link) is stored as a regular file
holding what it points at.

Debian's busybox-static (1.35) ``modprobe`` reads ``/lib/modules/$(uname -r)/modules.dep``
and loads a module's dependencies first. It loads ``.ko.xz`` files itself: the kernel's
``finit_module`` refuses the compressed file (no ``MODULE_INIT_COMPRESSED_FILE`` flag; it
logs "Invalid ELF header magic: != ELF"), and busybox then decompresses it
(FEATURE_SEAMLESS_XZ) and calls ``init_module``. So the files go in as installed.

/init runs ``modprobe NAME`` for each name in order and reports, in the format of
:mod:`tests.oracles.qemu`::

    KMT-RESULT <name> <modprobe exit status>
    KMT-MSG <name> <kernel log line or modprobe output line>   (zero or more)

then one ``KMT-LOADED <module>`` per line of /proc/modules, ``KMT-END`` and
``poweroff -f``.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.oracles.qemu import (
    _S_IFCHR,
    _S_IFDIR,
    _S_IFLNK,
    _S_IFREG,
    BUSYBOX,
    LoadResult,
    QemuOracleError,
    _Entry,
    _newc_archive,
    _run_qemu,
    parse_console,
    qemu_command,
)

_LOADED_RE = re.compile(r"KMT-LOADED (\S+)\s*$")
_UNAME_RE = re.compile(r"KMT-UNAME (\S+)\s*$")


@dataclass(frozen=True)
class ModprobeReport:
    results: dict[str, LoadResult]
    """Per requested name: did `modprobe NAME` succeed, and what it and the kernel said."""
    loaded: frozenset[str]
    """Every module in /proc/modules once all the modprobes ran."""
    files: tuple[str, ...]
    """The module files put in the initrd, relative to lib/modules/KVER, in modules.dep order."""
    uname: str
    """What `uname -r` said in the guest."""
    console: str


def module_name(path: str) -> str:
    """kmod's name for a module file: ``weak-updates/x/kmt-pkg.ko.xz`` → ``kmt_pkg``."""
    return PurePosixPath(path).name.split(".", 1)[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep → module name → (its path, the paths of its dependencies)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ValueError(f"modules.dep: not 'path: deps': {line!r}")
        entries[module_name(path)] = (path, deps.split())
    return entries


def dependency_order(modules_dep: str, names: Iterable[str]) -> list[str]:
    """The module files `names` need, as modules.dep says, each after its dependencies.

    modules.dep lists a module's dependencies transitively, nearest first, so loading
    them in reverse order before the module is what modprobe does."""
    entries = parse_modules_dep(modules_dep)
    by_path = {path: name for name, (path, _) in entries.items()}
    ordered: list[str] = []
    for name in names:
        if name not in entries:
            raise QemuOracleError(f"{name} is not in modules.dep")
        path, deps = entries[name]
        for dep in [*reversed(deps), path]:
            if dep not in by_path:
                raise QemuOracleError(f"modules.dep: {path} needs {dep}, which has no line")
            if dep not in ordered:
                ordered.append(dep)
    return ordered


def sort_by_dependencies(modules_dep: str, names: Iterable[str]) -> list[str]:
    """`names` in an order where each comes after those of `names` it depends on."""
    wanted = list(names)
    files = dependency_order(modules_dep, wanted)
    position = {module_name(path): i for i, path in enumerate(files)}
    return sorted(wanted, key=lambda name: position[name])


def init_script(kver: str, names: Sequence[str]) -> str:
    loads = "".join(f"kmt_modprobe {name}\n" for name in names)
    return f"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk
$B dmesg -c > /dev/null
echo "KMT-UNAME $($B uname -r)"
kmt_modprobe() {{
    $B modprobe -v "$1" > /tmp/modprobe.out 2>&1
    rc=$?
    echo "KMT-RESULT $1 $rc"
    $B dmesg -c | while IFS= read -r line; do echo "KMT-MSG $1 $line"; done
    while IFS= read -r line; do echo "KMT-MSG $1 $line"; done < /tmp/modprobe.out
}}
echo KMT-BEGIN
{loads}while read -r name rest; do echo "KMT-LOADED $name"; done < /proc/modules
echo KMT-END
$B sync
$B poweroff -f
"""


def _dirs(paths: Iterable[str]) -> list[str]:
    """Every directory above `paths`, parents first."""
    found: set[str] = set()
    for path in paths:
        found.update(os.fspath(parent) for parent in PurePosixPath(path).parents)
    found.discard(".")
    return sorted(found, key=lambda d: (d.count("/"), d))


def build_initrd(
    kver: str, moddir: Path, names: Sequence[str], dest: Path, busybox: Path = BUSYBOX
) -> list[str]:
    """Write the initrd to `dest`; return the module files (relative to `moddir`) it holds.

    `moddir` is a ``lib/modules/KVER`` directory holding a modules.dep."""
    modules_dep = (moddir / "modules.dep").read_text()
    files = dependency_order(modules_dep, names)
    base = f"lib/modules/{kver}"
    contents: list[_Entry] = []
    for rel in files:
        real = (moddir / rel).resolve()
        if not real.is_file():
            raise QemuOracleError(f"{moddir / rel}: no such module file (dangling link?)")
        contents.append(_Entry(f"{base}/{rel}", _S_IFREG | 0o644, real.read_bytes()))
    contents.append(_Entry(f"{base}/modules.dep", _S_IFREG | 0o644, modules_dep.encode()))
    dirs = _dirs([*(e.name for e in contents), "bin/sh", "dev/x", "proc/x", "sys/x", "tmp/x"])
    entries = [
        *(_Entry(d, _S_IFDIR | 0o755) for d in dirs),
        _Entry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("bin/busybox", _S_IFREG | 0o755, busybox.read_bytes()),
        _Entry("bin/sh", _S_IFLNK | 0o777, b"busybox"),
        _Entry("init", _S_IFREG | 0o755, init_script(kver, names).encode()),
        *contents,
    ]
    dest.write_bytes(gzip.compress(_newc_archive(entries), compresslevel=1))
    return files


def boot_and_modprobe(
    vmlinuz: Path,
    kver: str,
    moddir: Path,
    names: Sequence[str],
    workdir: Path,
    timeout: float = 180,
) -> ModprobeReport:
    """Boot `vmlinuz` with `moddir`'s modules.dep and the files `names` need, and run
    ``modprobe NAME`` for each name in order. ``workdir`` receives the initrd and the
    console log. Raises QemuOracleError on timeout or a missing result."""
    if not vmlinuz.is_file():
        raise QemuOracleError(f"kernel image not found: {os.fspath(vmlinuz)}")
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initrd.cpio.gz"
    files = build_initrd(kver, moddir, names, initrd)
    output = _run_qemu(qemu_command(vmlinuz, initrd), workdir / "console.log", timeout)
    results = parse_console(output, names)
    lines = [line.rstrip("\r") for line in output.splitlines()]
    loaded = frozenset(m.group(1) for line in lines if (m := _LOADED_RE.search(line)))
    unames = [m.group(1) for line in lines if (m := _UNAME_RE.search(line))]
    return ModprobeReport(results, loaded, tuple(files), unames[0] if unames else "", output)
