"""Boot a real kernel under QEMU with the initrd a machine's own generator made, and run
that initrd's own ``modprobe``: is what initramfs-tools or dracut put in it loadable?

The machine's ``/boot/initrd.img-K`` is booted unchanged, preceded by a small gzip'd
newc archive holding ``/kmt-init``, which the kernel runs instead of the initrd's /init
(``rdinit=/kmt-init``; nothing in the real initrd can overwrite that name, and dracut's
/init being a symlink does not matter). /kmt-init is portable POSIX sh, since the
initrd's /bin/sh may be klibc's sh, busybox or bash. For each name it runs the
initrd's modprobe (wherever it is) and reports in :mod:`tests.oracles.qemu`'s format::

    KMT-RESULT <name> <modprobe exit status>
    KMT-MSG <name> <kernel log line, then modprobe -v output line>   (zero or more)

then one ``KMT-LOADED <module>`` per line of /proc/modules, ``KMT-END``, and powers
off through /proc/sysrq-trigger (or, failing that, exits: panic=-1 and -no-reboot end
QEMU then).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import require_tool
from tests.oracles.qemu import (
    _S_IFCHR,
    _S_IFDIR,
    _S_IFREG,
    KERNEL_CMDLINE,
    QEMU,
    LoadResult,
    QemuOracleError,
    _Entry,
    _newc_archive,
    _run_qemu,
    parse_console,
    qemu_command,
)

INIT = "kmt-init"
MEMORY = "1024"  # a MODULES=most initrd unpacks to ~150 MB of tmpfs

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_LOADED_RE = re.compile(r"KMT-LOADED (\S+)\s*$")
_MARK = "kmt-init: modprobe"
# the marker, as klibc's (<12>[ 1.23] …) or util-linux's ([ 1.23] …) dmesg prints it
_MARK_RE = re.compile(rf"^.*KMT-MSG \S+ (<\d+>)?(\[[\s\d.]+\] ?)?{_MARK} \S+\s*$\n?", re.MULTILINE)


def init_script(names: Sequence[str]) -> str:
    """/kmt-init: mount the API file systems, modprobe each name with the initrd's own
    tools, report, power off. Only POSIX sh and tools found by trying each bin dir."""
    loads = "".join(f"kmt_modprobe {name}\n" for name in names)
    return f"""#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
kmt_find() {{
    for kmt_dir in /usr/sbin /usr/bin /sbin /bin; do
        if [ -x "$kmt_dir/$1" ]; then echo "$kmt_dir/$1"; return 0; fi
    done
    return 1
}}
MOUNT=$(kmt_find mount)
$MOUNT -t proc proc /proc
$MOUNT -t sysfs sysfs /sys
$MOUNT -t devtmpfs devtmpfs /dev
# kernel messages off the console: they are read with dmesg, per module
echo 1 > /proc/sys/kernel/printk
MODPROBE=$(kmt_find modprobe)
DMESG=$(kmt_find dmesg)
if [ -n "$DMESG" ]; then $DMESG -c > /dev/null 2>&1; fi
read -r kmt_release < /proc/sys/kernel/osrelease
echo "KMT-UNAME $kmt_release"
echo "KMT-TOOLS modprobe=$MODPROBE dmesg=$DMESG"
kmt_modprobe() {{
    # never an empty log to read: klibc's dmesg -c then prints garbage
    echo "{_MARK} $1" > /dev/kmsg
    if [ -n "$MODPROBE" ]; then
        $MODPROBE -v "$1" > /tmp/kmt.out 2>&1
        kmt_rc=$?
    else
        echo "no modprobe in this initrd" > /tmp/kmt.out
        kmt_rc=127
    fi
    echo "KMT-RESULT $1 $kmt_rc"
    if [ -n "$DMESG" ]; then
        $DMESG -c > /tmp/kmt.log 2>&1
        while IFS= read -r kmt_line; do echo "KMT-MSG $1 $kmt_line"; done < /tmp/kmt.log
    fi
    while IFS= read -r kmt_line; do echo "KMT-MSG $1 $kmt_line"; done < /tmp/kmt.out
}}
echo KMT-BEGIN
{loads}while read -r kmt_name kmt_rest; do echo "KMT-LOADED $kmt_name"; done < /proc/modules
echo KMT-END
echo o > /proc/sysrq-trigger
SLEEP=$(kmt_find sleep)
if [ -n "$SLEEP" ]; then $SLEEP 30; fi
"""


def overlay_archive(names: Sequence[str]) -> bytes:
    """The gzip'd newc archive put before the real initrd: /kmt-init and the mount points
    it needs (initramfs-tools' image has no /proc, /sys, /dev or /tmp; its /init makes them)."""
    entries = [
        *(_Entry(d, _S_IFDIR | 0o755) for d in ("dev", "proc", "sys", "tmp")),
        _Entry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry(INIT, _S_IFREG | 0o755, init_script(names).encode()),
    ]
    return gzip.compress(_newc_archive(entries), compresslevel=6)


def combined_initrd(initrd: Path, names: Sequence[str], dest: Path) -> Path:
    """Write the overlay then `initrd`, byte for byte, to `dest`. The kernel unpacks
    concatenated (compressed) archives in order; zeros between them are skipped."""
    overlay = overlay_archive(names)
    with dest.open("wb") as out, initrd.open("rb") as real:
        out.write(overlay + b"\0" * (-len(overlay) % 4))
        shutil.copyfileobj(real, out)
    return dest


def command(vmlinuz: Path, initrd: Path) -> list[str]:
    """tests.oracles.qemu's command with more memory and /kmt-init as the first process."""
    cmd = qemu_command(vmlinuz, initrd)
    cmd[cmd.index("-m") + 1] = MEMORY
    cmd[cmd.index("-append") + 1] = f"{KERNEL_CMDLINE} rdinit=/{INIT}"
    return cmd


def loaded_modules(console: str) -> frozenset[str]:
    """The modules /proc/modules listed once every modprobe ran."""
    lines = (line.rstrip("\r") for line in console.splitlines())
    return frozenset(m.group(1) for line in lines if (m := _LOADED_RE.search(line)))


def boot_initrd_and_modprobe(
    vmlinuz: Path, initrd: Path, names: Sequence[str], workdir: Path, timeout: float = 240
) -> tuple[dict[str, LoadResult], str]:
    """Boot `vmlinuz` with the real `initrd` (from a machine's /boot) and run the initrd's
    own ``modprobe NAME`` for each name in order. Returns name -> LoadResult and the
    console text. ``workdir`` receives ``console.log`` (and the combined initrd, kept
    when the guest gave no result).
    Raises QemuOracleError on a timeout or a name without a result."""
    require_tool(QEMU)
    for path in (vmlinuz, initrd):
        if not path.is_file():
            raise QemuOracleError(f"not found: {os.fspath(path)}")
    bad = [name for name in names if not _NAME_RE.fullmatch(name)]
    if bad:
        raise ValueError(f"not module names: {bad}")
    workdir.mkdir(parents=True, exist_ok=True)
    combined = combined_initrd(initrd, names, workdir / "initrd.img")
    console = _run_qemu(command(vmlinuz, combined), workdir / "console.log", timeout)
    results = parse_console(_MARK_RE.sub("", console), names)
    combined.unlink()  # as big as the real initrd; kept only when something went wrong
    return results, console
