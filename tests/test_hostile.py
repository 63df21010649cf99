"""Hostile and clumsy input, each case: the documented exit code, one line naming the
file and the problem, no traceback, nothing read or written outside the root."""

from __future__ import annotations

import lzma
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import K113, install_headers, require

TOP = Path(__file__).resolve().parent.parent


def kmodctl(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), *args],
        env=env, cwd=TOP, capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    install_headers(tmp_path / "root", K113)
    return tmp_path / "root"


def test_check_of_a_fifo_is_refused_without_blocking(root: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "module.ko"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = kmodctl(root, "check", "-k", K113, os.fspath(fifo), timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 3
    assert one_line(proc) == f"kmodctl: {fifo}: is not a regular file (a FIFO, socket or device?)"


def test_an_xz_bomb_is_refused_at_its_bound(root: Path, tmp_path: Path) -> None:
    """300 kB that would decompress to 600 MB: refused at 256 MB, memory bounded."""
    bomb = tmp_path / "bomb.ko.xz"
    squeezer = lzma.LZMACompressor(preset=0)
    with bomb.open("wb") as out:
        zeros = bytes(16 << 20)
        for _ in range(600 // 16):
            out.write(squeezer.compress(zeros))
        out.write(squeezer.flush())
    assert bomb.stat().st_size < 1 << 20
    proc = kmodctl(root, "check", "-k", K113, os.fspath(bomb))
    assert proc.returncode == 3
    assert one_line(proc) == f"kmodctl: {bomb}: decompresses to more than 256 MB"
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert children < 700 * 1024, f"peak {children} kB"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "not an ELF file"),
        (b"\x7fELF" + bytes(10), "ELF"),
        (lzma.compress(b"\x7fELF")[:-8], "corrupt xz data"),
    ],
    ids=["empty", "truncated-elf", "cut-xz"],
)
def test_a_broken_module_file_is_named(root: Path, tmp_path: Path, data: bytes, says: str) -> None:
    path = tmp_path / ("m.ko.xz" if says.startswith("corrupt") else "m.ko")
    path.write_bytes(data)
    proc = kmodctl(root, "check", "-k", K113, os.fspath(path))
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc)
    assert line.startswith(f"kmodctl: {path}: ") and says in line, line


def test_a_newline_in_package_name_cannot_forge_a_status_line(root: Path) -> None:
    src = root / "usr/src/kmt-evil-1.0"
    src.mkdir(parents=True)
    (src / "dkms.conf").write_text(
        "PACKAGE_NAME=$'kmt-evil\\nnvidia-535, 6.12.113+deb12-amd64, x86_64: installed'\n"
        'PACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="kmt_simple"\n'
        'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n'
    )
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert "PACKAGE_NAME" in done.stdout + done.stderr, done.stdout + done.stderr
    assert "holds characters a PACKAGE_NAME cannot" in done.stdout + done.stderr
    status = kmodctl(root, "status")
    (line,) = status.stdout.splitlines()  # the name's newline is shown escaped, in one line
    assert line.startswith(f"kmt-evil/1.0, {K113}, x86_64: failed ("), line


def test_a_mistyped_root_is_refused_and_left_uncreated(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    for args in (["status"], ["autoinstall", "-k", K113], ["plan", "-k", K113]):
        proc = kmodctl(missing, *args)
        assert proc.returncode == 2, proc.stderr
        assert one_line(proc) == f"kmodctl: {missing}: no such directory to use as the root"
    assert not missing.exists()


def test_remove_kernel_of_a_kernel_nobody_knows_is_not_found(root: Path) -> None:
    proc = kmodctl(root, "remove-kernel", "9.9.9-garbage")
    assert proc.returncode == 4
    assert one_line(proc) == "kmodctl: kmodd knows no kernel 9.9.9-garbage: nothing to remove"
    proc = kmodctl(root, "remove-kernel", "../../etc")
    assert proc.returncode == 2
    assert one_line(proc) == "kmodctl: '../../etc' is not a kernel release"


def test_a_read_only_state_dir_is_one_line_naming_it(root: Path, tmp_path: Path) -> None:
    """A state dir on a read-only mount (root's permissions do not stop root)."""
    state = root / "var/lib/kmodd"
    state.mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", state, state], check=False)
    require("a read-only bind mount (mount --bind -o ro, as root)", mounted.returncode == 0)
    try:
        proc = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
        assert proc.returncode == 5, proc.stderr
        line = one_line(proc)
        assert line.startswith(f"kmodctl: {state}/") and "Read-only file system" in line, line
    finally:
        subprocess.run(["umount", state], check=True)


def test_a_build_link_that_loops_is_no_headers_not_the_hosts(tmp_path: Path) -> None:
    """`build -> /lib/modules/K/build` points at itself inside the root; followed on
    this machine it would reach the host's own headers for K (installed here)."""
    root = tmp_path / "root"
    moddir = root / "lib/modules" / K113
    moddir.mkdir(parents=True)
    (moddir / "build").symlink_to(f"/lib/modules/{K113}/build")
    require(f"the host's own headers for {K113}", Path(f"/lib/modules/{K113}/build").exists())
    src = root / "usr/src/kmt-x-1.0"
    src.mkdir(parents=True)
    (src / "dkms.conf").write_text(
        'PACKAGE_NAME="kmt-x"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="kmt_x"\n'
        'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n'
    )
    plan = kmodctl(root, "plan", "-k", K113)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith(f"kmt-x/1.0, {K113}: waiting-for-headers: no headers"), (
        plan.stdout
    )


def test_a_symvers_linked_to_a_host_file_is_read_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install_headers(root, K113)
    symvers = root / f"usr/src/linux-headers-{K113}/Module.symvers"
    symvers.unlink()
    symvers.symlink_to("/etc/passwd")  # a host file, were the link followed here
    proc = kmodctl(root, "check", "-k", K113)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    line = one_line(proc)
    assert "has no exports file" in line and "passwd" not in line, line
