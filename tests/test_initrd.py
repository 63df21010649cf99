"""What kmodd owes a kernel's initrd, and whether a made image holds it: `kmodctl
initrd-modules` (what the generators' hooks add) and `kmodctl initrd-check` against
images listed by Debian's real lsinitramfs. The generators themselves run in the
system tier (tests/system)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import kmodctl
from tests.conftest import K111, K113, require_tool
from tests.oracles.qemu import _S_IFDIR, _S_IFREG, _Entry, _newc_archive
from tests.sources import write_source
from tests.test_autoinstall import make_system


@dataclass
class System:
    root: Path


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """K111 and K113; kmt-base (REMAKE_INITRD, kmt_simple) built for K111 and weak-linked
    for K113; kmt-pair (not for the initrd) too; Debian's lsinitramfs in the root."""
    lsinitramfs = require_tool("lsinitramfs")
    root = make_system(tmp_path_factory.mktemp("initrd") / "root", (K111, K113))
    for name in ("kmt-base", "kmt-pair"):
        write_source(root, name)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/lsinitramfs").symlink_to(lsinitramfs)
    for kver in (K111, K113):
        done = kmodctl(root, "autoinstall", "-k", kver)
        assert done.returncode == 0, done.stdout + done.stderr
    yield System(root)


def image(path: Path, kver: str, files: list[str]) -> Path:
    """A gzip'd newc initramfs holding `files` under usr/lib/modules/KVER/."""
    names = [f"usr/lib/modules/{kver}/{f}" for f in files]
    dirs = sorted({os.fspath(p) for n in names for p in Path(n).parents if p != Path()})
    entries = [_Entry(d, _S_IFDIR | 0o755) for d in dirs]
    entries += [_Entry(n, _S_IFREG | 0o644, b"\x7fELF not really") for n in names]
    path.write_bytes(gzip.compress(_newc_archive(entries)))
    return path


def line_for(root: Path, module: str, kver: str) -> str:
    proc = kmodctl(root, "status", "-m", module, "-k", kver)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return line


def test_initrd_modules_names_what_belongs_in_the_initrd_built_or_weak(system: System) -> None:
    for kver in (K111, K113):
        proc = kmodctl(system.root, "initrd-modules", "-k", kver)
        assert proc.returncode == 0, proc.stderr
        # kmt-pair is not REMAKE_INITRD; for K113 kmt_simple is a weak link into K111
        assert proc.stdout.splitlines() == ["kmt_simple"]
    proc = kmodctl(system.root, "initrd-modules", "-k", "9.9.9-none")
    assert (proc.returncode, proc.stdout) == (0, "")


def test_initrd_check_records_what_an_image_lacks_and_status_says_so(system: System) -> None:
    root = system.root
    lacking = image(root / f"boot/initrd.img-{K113}", K113, ["kernel/drivers/other.ko.xz"])
    proc = kmodctl(root, "initrd-check", "-k", K113, "--image", f"/boot/{lacking.name}")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert proc.stderr.startswith(
        f"kmodd: WARNING: initrd /boot/initrd.img-{K113} for {K113} lacks kmt_simple,"
    ), proc.stderr
    assert line_for(root, "kmt-base", K113).endswith(
        f"installed-weak (from {K111}), NOT in its initrd /boot/initrd.img-{K113}"
    )
    doc = json.loads(kmodctl(root, "status", "--json", "-m", "kmt-base", "-k", K113).stdout)
    assert doc[0]["in_initrd"] is False
    # kmt-pair owes the initrd nothing: no word of it
    assert line_for(root, "kmt-pair", K113).endswith("installed-weak (from 6.12.111+deb12-amd64)")


def test_initrd_check_of_an_image_that_holds_them(system: System) -> None:
    root = system.root
    holding = image(
        root / f"boot/initrd.img-{K111}",
        K111,
        ["kernel/drivers/other.ko.xz", "updates/dkms/kmt_simple.ko.xz"],
    )
    os.utime(holding, ns=(1, 1))
    proc = kmodctl(root, "initrd-check", "-k", K111)  # the image found in /boot
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"kmodd: initrd /boot/initrd.img-{K111} for {K111} holds kmt_simple\n"
    assert line_for(root, "kmt-base", K111).endswith(": installed, in initrd")

    # a newer image that nobody listed yet: status claims nothing about it
    os.utime(holding, ns=(2, 2))
    assert line_for(root, "kmt-base", K111).endswith(": installed")


def test_initrd_check_errors_name_what_is_wrong(system: System, tmp_path: Path) -> None:
    proc = kmodctl(system.root, "initrd-check", "-k", K111, "--image", "/boot/none.img")
    assert proc.returncode == 4, proc.stderr
    assert "no initrd for" in proc.stderr and "Traceback" not in proc.stderr
    garbage = system.root / "boot/garbage.img"
    garbage.write_bytes(b"not an initramfs at all")
    proc = kmodctl(system.root, "initrd-check", "-k", K111, "--image", "/boot/garbage.img")
    assert proc.returncode == 5, proc.stderr  # what the lister said, in one line
    assert proc.stderr.startswith("kmodctl: ") and "premature end of archive" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_root_where_kmodd_never_ran_gives_the_hooks_nothing(tmp_path: Path) -> None:
    """A root where kmodd never ran: the hooks get no names and no error."""
    require_tool("lsinitramfs")
    root = tmp_path / "root"
    root.mkdir()
    for command in ("initrd-modules", "initrd-check"):
        proc = kmodctl(root, command, "-k", K111)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    assert not (root / "var/lib/kmodd").exists(), "a read creates no state"


def test_a_source_installed_after_the_listing_is_not_claimed_to_be_in_it(system: System) -> None:
    """An image listed before a REMAKE_INITRD source came: status claims nothing for it."""
    root = system.root
    holding = image(root / f"boot/initrd.img-{K111}", K111, ["updates/dkms/kmt_simple.ko.xz"])
    os.utime(holding, ns=(3, 3))
    assert kmodctl(root, "initrd-check", "-k", K111).returncode == 0
    write_source(
        root,
        "kmt-later",
        modules=("kmt_kmalloc",),
        extra='AUTOINSTALL="yes"\nREMAKE_INITRD="yes"\n',
    )
    done = kmodctl(root, "install", "-m", "kmt-later", "-k", K111, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert line_for(root, "kmt-later", K111).endswith(": installed")
    assert line_for(root, "kmt-base", K111).endswith(": installed, in initrd")
