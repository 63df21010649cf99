"""Distribution facts, each in one place: which distribution a root is, where DKMS
puts built modules there, and kmodd doing the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.base.paths import Root
from kmodd.world import distro
from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.sources import write_source
from tests.test_autoinstall import make_system

# (first lines of the distribution's real /etc/os-release, its name, where modules go)
OS_RELEASES = [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n', "debian", "updates/dkms"),
    ('NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\n', "debian", "updates/dkms"),
    ('NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\n', "debian", "updates/dkms"),
    ('NAME="Arch Linux"\nID=arch\n', "arch", "updates/dkms"),
    ('NAME="Fedora Linux"\nID=fedora\n', "fedora", "extra"),
    ('NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n', "fedora", "extra"),
    ('NAME="SLES"\nID="sles"\nID_LIKE="suse"\n', "suse", "updates"),
    (
        'NAME="openSUSE Tumbleweed"\nID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n',
        "suse",
        "updates",
    ),
    ('NAME="Alpine Linux"\nID=alpine\n', "other", None),
]


@pytest.mark.parametrize(("text", "name", "module_dir"), OS_RELEASES)
def test_a_root_is_the_distribution_its_os_release_says(
    tmp_path: Path, text: str, name: str, module_dir: str | None
) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text(text)  # where /etc/os-release links to
    found = distro.detect(Root.at(tmp_path))
    assert (found.name, found.module_dir) == (name, module_dir)


def test_no_os_release_is_no_known_distribution(tmp_path: Path) -> None:
    assert distro.detect(Root.at(tmp_path)) is distro.OTHER


def test_on_suse_a_build_goes_to_updates_as_dkms_puts_it_there(tmp_path: Path) -> None:
    """Where DKMS installs on SUSE (`/updates`, its override_dest_module_location), so
    a machine moving from DKMS to kmodd keeps one copy of each module."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    (root / "etc/os-release").write_text('NAME="SLES"\nID="sles"\nID_LIKE="suse"\n')
    write_source(root, "kmt-base")
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    moddir = root / "lib/modules" / K113
    assert sorted(p.relative_to(moddir).as_posix() for p in moddir.rglob("kmt_*")) == [
        "updates/kmt_simple.ko.xz"
    ]
