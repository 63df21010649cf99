"""Hostile and clumsy input: dkms.conf files, source trees, build outputs, module and
symvers files, roots full of symlinks, a broken state dir, D-Bus calls from a user, and
signals. Each case checks what an admin sees: the documented exit code, one line
naming the file and the problem, no traceback; and that nothing outside the root was
written or read (a host dir of canaries beside the root: its files unchanged, nothing
added, and its secret token nowhere in kmodd's output or in what it wrote).

The cases that need a build never compile: their MAKE copies a module built once per
session (`given.ko` in the source) into place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.cli import kmodctl
from tests.conftest import K113, install_headers, require
from tests.dbus_harness import Bus, OtherUser, Server, as_other_user, running_service, system_bus
from tests.procs import all_gone, running
from tests.sources import write_source

TOP = Path(__file__).resolve().parent.parent
Proc = subprocess.CompletedProcess[str]


def one_line(proc: Proc) -> str:
    """The one line kmodctl said on stderr (no traceback)."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if "is not running for" not in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@dataclass
class Host:
    """Canaries on this machine, outside the root: a dir with a secret and a module."""

    dir: Path
    token: str

    @property
    def secret(self) -> Path:
        return self.dir / "secret"

    def snapshot(self) -> dict[str, str]:
        return {os.fspath(p.relative_to(self.dir)): _digest(p) for p in sorted(self.dir.rglob("*"))}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"


@dataclass
class World:
    root: Path
    host: Host
    before: dict[str, str]

    def kmodctl(self, *args: str, timeout: float = 120) -> Proc:
        return kmodctl(self.root, *args, timeout=timeout)

    def intact(self, *outputs: Proc) -> None:
        """Nothing of the host's was changed, added, or read into kmodd's output or
        into anything kmodd wrote in the root."""
        assert self.host.snapshot() == self.before, "a host file was written"
        token = self.host.token.encode()
        for proc in outputs:
            assert self.host.token not in proc.stdout + proc.stderr
        for written in ("var/lib/kmodd", "lib/modules"):
            for path in (self.root / written).rglob("*"):
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
                    assert token not in path.read_bytes(), f"{path} holds the host's secret"


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path / "root"
    install_headers(root, K113)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    host = Host(tmp_path / "host", f"KMODD-CANARY-{os.urandom(8).hex()}")
    (host.dir / "empty").mkdir(parents=True)
    host.secret.write_text(host.token + "\n")
    fake = host.dir / "usr-src/evil-1.0"
    fake.mkdir(parents=True)
    (fake / "dkms.conf").write_text(
        'PACKAGE_NAME="evil"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="evil"\n'
        'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n'
    )
    return World(root, host, host.snapshot())


@pytest.fixture(scope="session")
def given_ko(built: Callable[[str], dict[str, Path]]) -> bytes:
    """kmt_simple.ko built for 6.12.113 once: what the cheap test builds `make`."""
    return built(K113)["kmt_simple"].read_bytes()


@pytest.fixture
def buildable(world: World, given_ko: bytes) -> World:
    """`world` with K113's full headers (a build needs them)."""
    (world.root / "lib/modules" / K113 / "build").unlink()
    shutil.rmtree(world.root / f"usr/src/linux-headers-{K113}")
    install_headers(world.root, K113, full=True)
    return world


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def cheap_source(root: Path, name: str, make: str = "cp given.ko kmt_simple.ko",
                 given: bytes = b"", extra: str = "") -> Path:  # fmt: skip
    src = write_source(root, name, modules=("kmt_simple",),
                       extra=f'AUTOINSTALL="yes"\nMAKE[0]="{make}"\n{extra}')  # fmt: skip
    (src / "given.ko").write_bytes(given)
    return src


def conf_source(root: Path, body: str, dirname: str = "kmt-h-1.0") -> Path:
    src = root / "usr/src" / dirname
    src.mkdir(parents=True, exist_ok=True)
    (src / "dkms.conf").write_text(body)
    return src


MINIMAL = (
    'PACKAGE_NAME="kmt-h"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="kmt_simple"\n'
    'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n'
)

# dkms.conf ------------------------------------------------------------------------------

BAD_CONFS = {
    "syntax": ("if then fi\n" + MINIMAL, "syntax error"),
    "exit-0": ("exit 0\n" + MINIMAL, "stopped before the end of the file"),
    "exit-3": (MINIMAL + "exit 3\n", "exited with status 3"),
    "kills-itself": (MINIMAL + "kill -9 $$\n", "was killed by SIGKILL"),
    "slash-name": (MINIMAL + 'PACKAGE_NAME="a/b"\n', "PACKAGE_NAME: 'a/b' cannot be a directory"),
    "newline-name": (
        MINIMAL + "PACKAGE_NAME=$'kmt-h\\nfake, 1, x86_64: installed'\n",
        "holds characters a PACKAGE_NAME cannot",
    ),
    "binary-version": (
        MINIMAL + "PACKAGE_VERSION=$'1.\\xff'\n",
        "holds characters a PACKAGE_VERSION cannot",
    ),
    "dotdot-location": (
        MINIMAL + 'BUILT_MODULE_LOCATION[0]="../../etc"\n',
        "BUILT_MODULE_LOCATION[0]: '../../etc' contains '..'",
    ),
    "absolute-patch": (MINIMAL + 'PATCH[0]="/etc/passwd"\n', "'/etc/passwd' is absolute"),
    "dest-outside": (
        MINIMAL + 'DEST_MODULE_LOCATION[0]="/etc/cron.d"\n',
        "does not start with /kernel, /updates or /extra",
    ),
    "dotdot-dest": (
        MINIMAL + 'DEST_MODULE_LOCATION[0]="/updates/../../../etc"\n',
        "contains '..'",
    ),
    "huge-value": (
        MINIMAL + "BUILT_MODULE_NAME[1]=$(head -c 6000000 /dev/zero | tr '\\0' x)\n",
        "bash: printed more than 4194304 bytes",
    ),
    "bad-strip": (MINIMAL + 'STRIP[0]="maybe"\n', "STRIP[0]: 'maybe' is not yes or no"),
    "bad-regex": (MINIMAL + 'BUILD_EXCLUSIVE_KERNEL="(["\n', "is not a valid regex"),
    "bad-config-word": (
        MINIMAL + 'BUILD_EXCLUSIVE_CONFIG="rm -rf /"\n',
        "'rm' is not CONFIG_X or !CONFIG_X",
    ),
    "hook-outside": (MINIMAL + 'PRE_BUILD="../../bin/sh"\n', "contains '..'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFS))
def test_a_bad_dkms_conf_fails_its_source_alone_named(world: World, case: str) -> None:
    body, says = BAD_CONFS[case]
    src = conf_source(world.root, body)
    good = conf_source(world.root, MINIMAL.replace("kmt-h", "kmt-ok"), "kmt-ok-1.0")
    done = world.kmodctl("plan", "-k", K113)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    bad = [ln for ln in lines if not ln.startswith("kmt-ok/")]
    assert len(bad) == 1, lines
    assert f"{src}/dkms.conf" in bad[0] and says in bad[0], bad[0]
    assert f"kmt-ok/1.0, {K113}: build: " in done.stdout, good
    world.intact(done)


def test_a_dkms_conf_too_large_to_be_one_is_refused_unread(world: World) -> None:
    src = conf_source(world.root, MINIMAL + "#" * (2 << 20) + "\n")
    done = world.kmodctl("plan", "-k", K113)
    assert f"{src}/dkms.conf: is larger than 1024 kB: not a dkms.conf" in done.stdout
    world.intact(done)


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_dkms_conf_that_is_no_file_is_skipped_and_said(world: World, kind: str) -> None:
    src = world.root / "usr/src/kmt-h-1.0"
    src.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(src / "dkms.conf")
    else:
        (src / "dkms.conf").mkdir()
    done = world.kmodctl("plan", "-k", K113, timeout=30)
    assert done.returncode == 0 and done.stdout == ""
    assert "its dkms.conf is not a regular file" in one_line(done)
    assert f"{src}/dkms.conf" in done.stderr
    world.intact(done)


def test_a_dkms_conf_of_binary_garbage_is_named(world: World) -> None:
    src = conf_source(world.root, "")
    (src / "dkms.conf").write_bytes(bytes(range(256)) * 8)
    done = world.kmodctl("plan", "-k", K113)
    (line,) = done.stdout.splitlines()
    assert ": failed: " in line and f"{src}/dkms.conf" in line, line
    world.intact(done)


# source trees ---------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_source_dir_linked_out_of_the_root_is_looked_for_inside_it(
    world: World, link: str
) -> None:
    """`usr/src/evil-1.0` → a host dir holding a dkms.conf: followed as a chroot would,
    it is not there, so nothing of it is evaluated, built or shown."""
    target = world.host.dir / "usr-src/evil-1.0"
    entry = world.root / "usr/src/evil-1.0"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to(target if link == "absolute" else os.path.relpath(target, entry.parent))
    for args in (("plan", "-k", K113), ("status",), ("autoinstall", "-k", K113, "--no-initrd")):
        done = world.kmodctl(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "evil" not in done.stdout, done.stdout
        world.intact(done)


def test_a_fifo_in_a_source_tree_fails_that_source_unopened(
    buildable: World, given_ko: bytes
) -> None:
    world = buildable
    src = cheap_source(world.root, "kmt-fifo", given=given_ko)
    os.mkfifo(src / "pipe")
    done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd", timeout=60)
    assert done.returncode == 7, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert f"{src}/pipe: is not a regular file, directory or link" in line, line
    world.intact(done)


def test_a_link_in_a_source_tree_to_a_host_secret_reads_nothing(
    buildable: World, given_ko: bytes
) -> None:
    world = buildable
    src = cheap_source(world.root, "kmt-peek", "cat secret; cp given.ko kmt_simple.ko", given_ko)
    (src / "secret").symlink_to(world.host.secret)
    done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    log = next((world.root / "var/lib/kmodd/builds/kmt-peek").rglob("make.log")).read_text()
    assert "cat: secret: No such file or directory" in log, log
    world.intact(done)


def test_a_source_dir_name_with_a_newline_is_skipped_and_said(world: World) -> None:
    conf_source(world.root, MINIMAL, "kmt-h-1.0\nfake")
    done = world.kmodctl("plan", "-k", K113)
    assert done.returncode == 0 and done.stdout == ""
    assert "source skipped: its name or version holds characters" in one_line(done)
    world.intact(done)


# build outputs --------------------------------------------------------------------------

# name → (the MAKE command, the problem said)
BAD_OUTPUTS = {
    "link-out": ("ln -s {secret} kmt_simple.ko", "kmt_simple.ko is not a regular file"),
    "empty": ("touch kmt_simple.ko", "kmt_simple.ko is not a kernel module"),
    "text": ("echo not an ELF > kmt_simple.ko", "kmt_simple.ko is not a kernel module"),
    "fifo": ("mkfifo kmt_simple.ko", "kmt_simple.ko is not a regular file"),
    "executable": ("cp /bin/true kmt_simple.ko", "not a kernel module"),
    "other-arch": ("cp arm.ko kmt_simple.ko", "kmt_simple.ko is built for aarch64, not x86_64"),
    "too-big": ("truncate -s 600M kmt_simple.ko", "kmt_simple.ko is larger than 512 MB"),
    "dir-out": ("ln -s {outside} out", "out/kmt_simple.ko lies outside the build dir"),
    "none": ("true", "make produced no kmt_simple.ko"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_a_build_output_that_is_not_a_module_of_its_own_fails_named(
    buildable: World, given_ko: bytes, case: str
) -> None:
    world = buildable
    make, says = BAD_OUTPUTS[case]
    outside = world.host.dir / "empty"
    make = make.format(secret=world.host.secret, outside=outside)
    location = 'BUILT_MODULE_LOCATION[0]="out"\n' if case == "dir-out" else ""
    src = cheap_source(world.root, f"kmt-{case}", make, given_ko, location)
    arm = bytearray(given_ko)
    arm[18:20] = (183).to_bytes(2, "little")  # e_machine: EM_AARCH64
    (src / "arm.ko").write_bytes(bytes(arm))
    before = world.host.snapshot()
    (outside / "kmt_simple.ko").write_bytes(given_ko)  # a good module, outside
    world.before = world.host.snapshot()
    done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 7, done.stdout + done.stderr
    assert says in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not list((world.root / "lib/modules" / K113).rglob("kmt_simple*")), "nothing installed"
    (line,) = json.loads(world.kmodctl("status", "--json").stdout)
    assert line["state"] == "failed"
    check = world.kmodctl("check", "-k", K113)
    assert check.returncode in (0, 1), check.stdout + check.stderr  # no broken file to trip on
    world.intact(done)
    (outside / "kmt_simple.ko").unlink()
    assert world.host.snapshot() == before


# module files (`kmodctl check`) ---------------------------------------------------------


def _bomb(kind: str) -> bytes:
    zeros = bytes(16 << 20)
    if kind == "xz":
        squeezer = lzma.LZMACompressor(preset=0)
        return b"".join(squeezer.compress(zeros) for _ in range(20)) + squeezer.flush()
    if kind == "gz":
        return gzip.compress(zeros * 20, compresslevel=9)
    return zstandard.ZstdCompressor(level=3).compress(zeros * 20)


def _corrupt_versions(ko: bytes) -> bytes:
    """`ko` with its __versions section one byte short of a whole record."""
    import struct

    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    names_off = struct.unpack_from("<Q", ko, shoff + shstrndx * shentsize + 24)[0]
    data = bytearray(ko)
    for i in range(shnum):
        at = shoff + i * shentsize
        name_at = names_off + struct.unpack_from("<I", ko, at)[0]
        if ko[name_at : name_at + 11] == b"__versions\0":
            size = struct.unpack_from("<Q", ko, at + 32)[0]
            struct.pack_into("<Q", data, at + 32, size - 1)
            return bytes(data)
    raise AssertionError("no __versions section")


# name → (how to make the file at PATH, exit code, what the line says after PATH)
BAD_MODULES: dict[str, tuple[Callable[[Path, bytes], object], int, str]] = {
    "fifo": (lambda p, ko: os.mkfifo(p), 3, "is not a regular file (a FIFO, socket or device?)"),
    "dir": (lambda p, ko: p.mkdir(), 3, "is a directory, not a file"),
    "device": (lambda p, ko: p.symlink_to("/dev/zero"), 3, "is not a regular file"),
    "missing": (lambda p, ko: None, 4, "no such module file"),
    "empty": (lambda p, ko: p.write_bytes(b""), 3, "not an ELF file"),
    "truncated": (lambda p, ko: p.write_bytes(ko[:2000]), 3, "truncated"),
    "elf-header-only": (lambda p, ko: p.write_bytes(b"\x7fELF" + bytes(60)), 3, "corrupt ELF"),
    "executable": (
        lambda p, ko: p.write_bytes(Path("/bin/true").read_bytes()),
        3,
        "not a kernel module (ELF file is not relocatable)",
    ),
    "versions": (
        lambda p, ko: p.write_bytes(_corrupt_versions(ko)),
        3,
        "corrupt __versions section (size not a multiple of 64)",
    ),
    "xz-bomb": (lambda p, ko: p.write_bytes(_bomb("xz")), 3, "decompresses to more than 256 MB"),
    "gz-bomb": (lambda p, ko: p.write_bytes(_bomb("gz")), 3, "decompresses to more than 256 MB"),
    "zst-bomb": (lambda p, ko: p.write_bytes(_bomb("zst")), 3, "decompresses to more than 256 MB"),
    "cut-xz": (lambda p, ko: p.write_bytes(lzma.compress(ko)[:-100]), 3, "corrupt xz data"),
    "garbage-gz": (lambda p, ko: p.write_bytes(b"\x1f\x8b" + bytes(50)), 3, "corrupt gz data"),
    "sparse-huge": (lambda p, ko: _sparse(p, 300 << 20), 3, "larger than 256 MB"),
}
_SUFFIX = {"xz-bomb": ".ko.xz", "cut-xz": ".ko.xz", "gz-bomb": ".ko.gz", "garbage-gz": ".ko.gz",
           "zst-bomb": ".ko.zst"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_a_bad_module_file_is_one_line_naming_it(
    world: World, given_ko: bytes, tmp_path: Path, case: str
) -> None:
    make, code, says = BAD_MODULES[case]
    path = tmp_path / f"m{_SUFFIX.get(case, '.ko')}"
    make(path, given_ko)
    start = time.monotonic()
    done = world.kmodctl("check", "-k", K113, os.fspath(path), timeout=60)
    assert time.monotonic() - start < 30
    assert done.returncode == code, done.stdout + done.stderr
    line = one_line(done)
    assert line.startswith(f"kmodctl: {path}: ") and says in line, line
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak < 1 << 20, f"peak {peak} kB"  # a bomb is refused at its bound, not held
    world.intact(done)


# symvers files ----------------------------------------------------------------------------

BAD_SYMVERS: dict[str, tuple[Callable[[Path], object], str]] = {
    "non-ascii": (lambda p: p.write_bytes(b"0x1\tsym\tvmlinux\tEXPORT_SYMBOL\xff\n"), "non-ASCII"),
    "columns": (lambda p: p.write_text("0x1\tsym\tvmlinux\n"), "found 3"),
    "crc": (lambda p: p.write_text("0xZZ\tsym\tvmlinux\tEXPORT_SYMBOL\n"), "not hexadecimal"),
    "empty": (lambda p: p.write_text(""), "no exported symbols"),
    "fifo": (lambda p: os.mkfifo(p), "is not a regular file"),
    "huge": (lambda p: _sparse(p, 300 << 20), "larger than 256 MB"),
    "kind": (lambda p: p.write_text("0x1\tsym\tvmlinux\tGPL\n"), "malformed export"),
}


@pytest.mark.parametrize("case", sorted(BAD_SYMVERS))
def test_a_bad_symvers_is_one_line_naming_it(
    world: World, given_ko: bytes, tmp_path: Path, case: str
) -> None:
    make, says = BAD_SYMVERS[case]
    symvers = world.root / f"usr/src/linux-headers-{K113}/Module.symvers"
    symvers.unlink()
    make(symvers)
    module = tmp_path / "m.ko"
    module.write_bytes(given_ko)
    done = world.kmodctl("check", "-k", K113, os.fspath(module), timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    line = one_line(done)
    assert line.startswith(f"kmodctl: {symvers}") and says in line, line
    world.intact(done)


def test_a_symvers_linked_to_a_host_file_is_read_inside_the_root(world: World) -> None:
    symvers = world.root / f"usr/src/linux-headers-{K113}/Module.symvers"
    symvers.unlink()
    symvers.symlink_to(world.host.secret)  # a host file, were the link followed here
    done = world.kmodctl("check", "-k", K113)
    assert done.returncode == 4, done.stdout + done.stderr
    line = one_line(done)
    assert "has no exports file" in line, line
    world.intact(done)


def test_a_build_link_that_loops_is_no_headers_not_the_hosts(world: World) -> None:
    """`build` → itself inside the root; followed on this machine it would reach the
    host's own headers for K113 (installed here)."""
    require(f"the host's own headers for {K113}", Path(f"/lib/modules/{K113}/build").exists())
    build = world.root / "lib/modules" / K113 / "build"
    build.unlink()
    build.symlink_to(f"/lib/modules/{K113}/build")
    conf_source(world.root, MINIMAL)
    done = world.kmodctl("plan", "-k", K113)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"kmt-h/1.0, {K113}: waiting-for-headers: no headers")
    world.intact(done)


# roots full of symlinks -------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["updates", "updates/dkms"])
def test_a_modules_tree_linked_anywhere_is_refused_named(
    buildable: World, given_ko: bytes, tree: str
) -> None:
    world = buildable
    cheap_source(world.root, "kmt-h", given=given_ko)
    link = world.root / "lib/modules" / K113 / tree
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(world.host.dir / "empty")
    done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 7, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert f"{link}: is a symbolic link: kmodd writes only into real directories" in line, line
    assert list((world.host.dir / "empty").iterdir()) == []
    world.intact(done)


@pytest.mark.parametrize("where", ["var/lib/kmodd", "var/lib/kmodd/work", "var/lib"])
def test_a_state_dir_linked_to_a_host_dir_is_followed_inside_the_root(
    buildable: World, given_ko: bytes, where: str
) -> None:
    world = buildable
    cheap_source(world.root, "kmt-h", given=given_ko)
    link = world.root / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(world.host.dir / "empty")
    done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"kmodd: kmt-h/1.0 for {K113}: built\n"
    inside = world.root / (world.host.dir / "empty").relative_to("/")
    assert inside.is_dir(), "kmodd's state went to the link's target inside the root"
    world.intact(done)


def test_a_kernel_dir_linked_to_the_hosts_is_not_the_hosts(world: World) -> None:
    require("this machine's own modules dir for K113", Path(f"/lib/modules/{K113}").is_dir())
    moddir = world.root / "lib/modules" / K113
    (moddir / "build").unlink()
    moddir.rmdir()
    moddir.symlink_to(f"/lib/modules/{K113}")  # inside the root: itself
    done = world.kmodctl("check", "-k", K113)
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"kernel {K113} is not installed" in one_line(done)
    world.intact(done)


def test_a_usr_src_that_loops_is_one_line(world: World) -> None:
    usr_src = world.root / "usr/src"
    usr_src.rename(world.root / "usr/src.real")
    usr_src.symlink_to("/usr/src")
    done = world.kmodctl("status")
    assert done.returncode == 3, done.stdout + done.stderr
    assert one_line(done) == (f"kmodctl: {usr_src}: too many levels of symbolic links in the root")
    world.intact(done)


def test_a_kmodd_conf_linked_to_a_host_file_is_not_read(world: World) -> None:
    conf = world.root / "etc/kmodd/kmodd.conf"
    conf.parent.mkdir(parents=True)
    conf.symlink_to(world.host.secret)  # read on this machine, it is no kmodd.conf at all
    conf_source(world.root, MINIMAL)
    done = world.kmodctl("plan", "-k", K113)
    assert done.returncode == 0, done.stdout + done.stderr
    world.intact(done)


# the state dir ----------------------------------------------------------------------------

BAD_STATES: dict[str, tuple[Callable[[Path], object], str]] = {
    "garbage": (lambda p: p.write_bytes(os.urandom(8192)), "file is not a database"),
    "directory": (lambda p: p.mkdir(), "state.db"),
    "newer": (
        lambda p: sqlite3.connect(p).execute("PRAGMA user_version=99").connection.close(),
        "state schema 99 is newer than this kmodd",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
@pytest.mark.parametrize("command", ["status", "autoinstall"])
def test_a_broken_state_is_one_line_naming_it(world: World, case: str, command: str) -> None:
    make, says = BAD_STATES[case]
    state = world.root / "var/lib/kmodd/state.db"
    state.parent.mkdir(parents=True)
    make(state)
    args = ["status"] if command == "status" else ["autoinstall", "-k", K113, "--no-initrd"]
    done = world.kmodctl(*args)
    assert done.returncode == 5, done.stdout + done.stderr
    line = one_line(done)
    assert f"{state}" in line and says in line, line
    world.intact(done)


def test_a_read_only_state_dir_is_one_line_naming_it(world: World) -> None:
    """A state dir on a read-only mount (root's permissions do not stop root)."""
    state = world.root / "var/lib/kmodd"
    state.mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", state, state], check=False)
    require("a read-only bind mount (mount --bind -o ro, as root)", mounted.returncode == 0)
    try:
        done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd")
        assert done.returncode == 5, done.stderr
        line = one_line(done)
        assert line.startswith(f"kmodctl: {state}/") and "Read-only file system" in line, line
    finally:
        subprocess.run(["umount", state], check=True)


def test_a_full_disk_is_one_line_naming_the_path(buildable: World, given_ko: bytes) -> None:
    world = buildable
    cheap_source(world.root, "kmt-h", given=given_ko)
    state = world.root / "var/lib/kmodd"
    state.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "kmodd-full", state],
                             check=False)  # fmt: skip
    require("a small tmpfs (mount -t tmpfs, as root)", mounted.returncode == 0)
    try:
        (state / "filler").write_bytes(b"x" * 40_000)
        done = world.kmodctl("autoinstall", "-k", K113, "--no-initrd")
        assert done.returncode in (5, 7), done.stdout + done.stderr
        said = done.stderr if done.returncode == 5 else done.stdout
        assert "No space left on device" in said and f"{state}" in said, said
        assert "Traceback" not in done.stdout + done.stderr
    finally:
        subprocess.run(["umount", state], check=True)
    world.intact(done)


def test_a_mistyped_root_is_refused_and_left_uncreated(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    for args in (["status"], ["autoinstall", "-k", K113], ["plan", "-k", K113]):
        done = kmodctl(missing, *args)
        assert done.returncode == 2, done.stderr
        assert one_line(done) == f"kmodctl: {missing}: no such directory to use as the root"
    assert not missing.exists()


@pytest.mark.parametrize(
    ("release", "code", "says"),
    [
        ("9.9.9-garbage", 4, "kmodd knows no kernel 9.9.9-garbage: nothing to remove"),
        ("../../etc", 2, "'../../etc' is not a kernel release"),
        ("x" * 5000, 2, "is not a kernel release"),
    ],
    ids=["unknown", "path", "long"],
)
def test_remove_kernel_of_a_bad_name(world: World, release: str, code: int, says: str) -> None:
    done = world.kmodctl("remove-kernel", release)
    assert done.returncode == code
    line = one_line(done)
    assert says in line and len(line) < 300, line


# signals and pipes ------------------------------------------------------------------------


def test_sighup_stops_a_build_as_sigterm_does(buildable: World, given_ko: bytes) -> None:
    world = buildable
    cheap_source(world.root, "kmt-slow", "sleep 64; cp given.ko kmt_simple.ko", given_ko)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(world.root),
         "autoinstall", "-k", K113, "--no-initrd"],
        env=env, cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not running("sleep 64"):
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 129, out + err
    assert err.splitlines()[-1].startswith("kmodctl: cancelled"), err
    assert "Traceback" not in err
    assert all_gone("sleep 64")


def test_status_into_a_closed_pipe_is_quiet(world: World) -> None:
    for i in range(1500):  # more than a pipe holds
        conf_source(world.root, MINIMAL.replace("kmt-h", f"kmt-h{i}"), f"kmt-h{i}-1.0")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    done = subprocess.run(
        f"{sys.executable} -m kmodd.edges.cli --root {world.root} status | head -1",
        shell=True, env=env, cwd=TOP, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# D-Bus from a user ------------------------------------------------------------------------


@dataclass
class OnBus:
    root: Path
    bus: Bus
    other: OtherUser
    server: Server


@pytest.fixture(scope="module")
def on_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnBus]:
    tmp = tmp_path_factory.mktemp("hostile-bus")
    root = tmp / "root"
    install_headers(root, K113)
    conf_source(root, MINIMAL)
    with (
        system_bus(tmp / "bus") as bus,
        running_service(bus, root, tmp / "kmodd.log") as server,
        as_other_user() as other,
    ):
        yield OnBus(root, bus, other, server)


HOSTILE_CALLS: dict[str, tuple[str, str, list[object], str]] = {
    # name → (member, signature, body, the error's D-Bus name)
    "status-20MB-kernel": ("Status", "ss", ["", "x" * (20 << 20)], "InvalidArgs"),
    "plan-20MB-kernel": ("Plan", "s", ["6" * (20 << 20)], "InvalidArgs"),
    "plan-path": ("Plan", "s", ["../../../etc"], "InvalidArgs"),
    "status-newline-module": ("Status", "ss", ["kmt-h\nfake", ""], "InvalidArgs"),
    "getlog-2^63": ("GetLog", "t", [2**63], "NotFound"),
    "getlog-0": ("GetLog", "t", [0], "NotFound"),
    "wait-nan": ("Wait", "sd", [K113, float("nan")], "InvalidArgs"),
    "wait-forever": ("Wait", "sd", [K113, 1e300], "InvalidArgs"),
    "submit-as-user": ("Submit", "a{sv}", [{}], "AccessDenied"),
    "cancel-as-user": ("Cancel", "t", [1], "AccessDenied"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CALLS))
def test_a_hostile_call_from_a_user_is_one_short_error(on_bus: OnBus, case: str) -> None:
    member, signature, body, name = HOSTILE_CALLS[case]
    answer = on_bus.other.call_raw(on_bus.bus, member, signature, body)
    assert answer.get("dbus_name") == f"io.kmodd1.Error.{name}", answer
    assert len(answer["text"]) < 300 and "Traceback" not in answer["text"], answer
    status = on_bus.other.call(on_bus.bus, "status")
    assert [ln["module"] for ln in status["result"]] == ["kmt-h"], status
    log = on_bus.server.output()
    assert "Traceback" not in log and "x" * 1000 not in log and "6" * 1000 not in log
