"""Boot a real kernel under QEMU (TCG) and insmod modules in it: the load-time oracle.

The guest runs a tiny initramfs: a static busybox, the modules under /m/ and an /init
script that insmods them in the given order and reports one machine-readable block per
module on the serial console::

    KMT-RESULT <name> <insmod exit status>
    KMT-MSG <name> <kernel log line or insmod error line>   (zero or more)

then ``KMT-END`` and ``poweroff -f``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=4"

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_RESULT_RE = re.compile(r"KMT-RESULT (\S+) (-?\d+)\s*$")
_MSG_RE = re.compile(r"KMT-MSG (\S+) ?(.*)$")
_TIMESTAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_END_MARK = "KMT-END"
_TAIL_LINES = 60

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000
_S_IFCHR = 0o020000


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one ``insmod`` in the guest.

    ``message`` holds the kernel log lines printed during that insmod (timestamps
    stripped), then busybox insmod's own error line, if any, joined by newlines.
    """

    loaded: bool
    message: str


class QemuOracleError(RuntimeError):
    """The guest did not produce a result for every module (timeout, panic, bad initrd)."""


# --- initramfs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _newc_record(ino: int, entry: _Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if entry.mode & _S_IFDIR == _S_IFDIR else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % field for field in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def _newc_archive(entries: Iterable[_Entry]) -> bytes:
    records = [_newc_record(ino, entry) for ino, entry in enumerate(entries, start=1)]
    records.append(_newc_record(0, _Entry("TRAILER!!!", 0)))
    return b"".join(records)


def _module_names(modules: Sequence[Path]) -> list[str]:
    names = [module_name(path) for path in modules]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate module names: {', '.join(duplicates)}")
    return names


def module_name(path: Path) -> str:
    """Key used in results: the file name without ``.ko`` (``kmt_misc.ko`` -> ``kmt_misc``)."""
    if path.suffix != ".ko":
        raise ValueError(f"not an uncompressed .ko file: {os.fspath(path)}")
    if not _NAME_RE.fullmatch(path.stem):
        raise ValueError(f"unsupported module file name: {path.name!r}")
    return path.stem


def init_script(names: Sequence[str]) -> str:
    """The guest's /init: insmod /m/<name>.ko for each name, in order, and report."""
    loads = "".join(f"kmt_load {name}\n" for name in names)
    return f"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
# Keep kernel messages off the console from here on: they are read with dmesg instead.
echo 1 > /proc/sys/kernel/printk
$B dmesg -c > /dev/null
kmt_load() {{
    $B insmod "/m/$1.ko" > /tmp/insmod.out 2>&1
    rc=$?
    echo "KMT-RESULT $1 $rc"
    $B dmesg -c | while IFS= read -r line; do echo "KMT-MSG $1 $line"; done
    while IFS= read -r line; do echo "KMT-MSG $1 $line"; done < /tmp/insmod.out
}}
echo KMT-BEGIN
{loads}echo {_END_MARK}
$B sync
$B poweroff -f
"""


def build_initrd(modules: Sequence[Path], dest: Path, busybox: Path = BUSYBOX) -> Path:
    """Write a gzip'd newc cpio initramfs with busybox, /init and the modules to ``dest``."""
    names = _module_names(modules)
    entries = [
        *(_Entry(d, _S_IFDIR | 0o755) for d in ("bin", "dev", "m", "proc", "sys", "tmp")),
        _Entry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("bin/busybox", _S_IFREG | 0o755, busybox.read_bytes()),
        _Entry("bin/sh", _S_IFLNK | 0o777, b"busybox"),
        _Entry("init", _S_IFREG | 0o755, init_script(names).encode()),
        *(
            _Entry(f"m/{name}.ko", _S_IFREG | 0o644, path.read_bytes())
            for name, path in zip(names, modules, strict=True)
        ),
    ]
    dest.write_bytes(gzip.compress(_newc_archive(entries), compresslevel=1))
    return dest


# --- console parsing ---------------------------------------------------------------------


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _console_lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.splitlines()]


def parse_console(text: str, names: Sequence[str]) -> dict[str, LoadResult]:
    """Turn the guest's serial output into one LoadResult per name.

    Raises QemuOracleError (with the console tail) when a module has no KMT-RESULT line.
    """
    codes: dict[str, int] = {}
    messages: dict[str, list[str]] = {name: [] for name in names}
    for line in _console_lines(text):
        if result := _RESULT_RE.search(line):
            codes[result.group(1)] = int(result.group(2))
        elif (msg := _MSG_RE.search(line)) and msg.group(1) in messages:
            messages[msg.group(1)].append(_TIMESTAMP_RE.sub("", msg.group(2)))
    missing = [name for name in names if name not in codes]
    if missing:
        raise QemuOracleError(
            f"no KMT-RESULT for {', '.join(missing)}; console tail:\n{_tail(text)}"
        )
    return {
        name: LoadResult(loaded=codes[name] == 0, message="\n".join(messages[name]))
        for name in names
    }


# --- running QEMU ------------------------------------------------------------------------


def qemu_command(vmlinuz: Path, initrd: Path) -> list[str]:
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise QemuOracleError(f"{QEMU} not found in PATH")
    return [
        qemu,
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "512",
        "-kernel", os.fspath(vmlinuz),
        "-initrd", os.fspath(initrd),
        "-append", KERNEL_CMDLINE,
        "-nographic",
        "-no-reboot",
    ]  # fmt: skip


def _run_qemu(cmd: list[str], console_log: Path, timeout: float) -> str:
    with console_log.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        else:
            timed_out = False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = console_log.read_text(errors="replace")
    if timed_out:
        raise QemuOracleError(
            f"qemu did not finish within {timeout:g} s (killed); console tail:\n{_tail(output)}"
        )
    return output


def boot_and_insmod(
    vmlinuz: Path, modules: list[Path], workdir: Path, timeout: float = 120
) -> dict[str, LoadResult]:
    """Boot ``vmlinuz`` under QEMU and insmod ``modules`` in list order.

    Providers must come before their consumers in ``modules``. Returns module name
    (file name without ``.ko``) -> LoadResult. ``workdir`` receives the initrd and the
    console log (``console.log``). Raises QemuOracleError on timeout or missing results.
    """
    if not vmlinuz.is_file():
        raise QemuOracleError(f"kernel image not found: {os.fspath(vmlinuz)}")
    names = _module_names(modules)
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = build_initrd(modules, workdir / "initrd.cpio.gz")
    cmd = qemu_command(vmlinuz, initrd)
    output = _run_qemu(cmd, workdir / "console.log", timeout)
    return parse_console(output, names)
