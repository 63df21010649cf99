"""Which installed drivers present devices want: real modules' aliases, real udev."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kmodd.act import devices
from kmodd.base.paths import Root
from kmodd.world import modfile
from tests.cli import kmodctl
from tests.conftest import K113, require, require_tool
from tests.sources import write_source
from tests.test_autoinstall import make_system


def test_a_device_wants_the_driver_whose_alias_matches() -> None:
    e1000 = sorted(
        Path(f"/lib/modules/{K113}/kernel/drivers/net/ethernet/intel").rglob("e1000.ko*")
    )
    require(f"e1000.ko* under /lib/modules/{K113} (package linux-image-{K113})", bool(e1000))
    info = modfile.read(e1000[0])
    assert "pci:v00008086d0000100Esv*sd*bc*sc*i*" in info.aliases
    present = ["pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00", "acpi:LNXSYSTM:"]
    assert devices.wanted_aliases([info], present) == [present[0]]
    assert devices.wanted_aliases([info], ["pci:v000010ECd00008139sv0sd0bc02sc00i00"]) == []


def test_udev_lists_the_present_devices_as_sysfs_does() -> None:
    """pyudev's answer against the kernel's own: every non-empty modalias file in sysfs."""
    in_sysfs = set()
    for directory, _, files in os.walk("/sys/devices"):
        if "modalias" in files:
            with contextlib.suppress(OSError):
                alias = Path(directory, "modalias").read_text().strip()
                if alias:
                    in_sysfs.add(alias)
    require("devices with a modalias in /sys/devices", bool(in_sysfs))
    assert set(devices.present_modaliases()) == in_sysfs


def test_loaded_modules_are_seen_in_sysfs_only_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "sys/module/kmt_simple").mkdir(parents=True)
    assert modfile.is_loaded(Root.at(tmp_path), "kmt-simple")
    assert not modfile.is_loaded(Root.at(tmp_path), "kmt_misc")
    assert devices.load_for_present_devices(Root.at(tmp_path), []) == []


def test_a_present_device_gets_the_driver_unless_it_is_blacklisted(tmp_path: Path) -> None:
    """A source whose module claims a device of this machine (its exact modalias):
    after the build, real modprobe, resolving through the root's own modules.alias
    as kmodd asks it to (`-b`, by modalias), would load it for that device; once the
    root's /etc/modprobe.d blacklists it, it would not (loading by name, as kmodd did
    before, ignores blacklists)."""
    require_tool("make")
    require_tool("modprobe")
    present = sorted(devices.present_modaliases())
    require("a device with a modalias on this machine", bool(present))
    device = next((a for a in present if a.startswith("pci:")), present[0])
    root = make_system(tmp_path / "root", (K113,))
    src = write_source(root, "kmt-dev", modules=("kmt_simple",), extra='AUTOINSTALL="yes"\n')
    with (src / "kmt_simple.c").open("a") as c:
        c.write(f'MODULE_ALIAS("{device}");\n')

    built = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert built.stdout.splitlines() == [f"kmodd: kmt-dev/1.0 for {K113}: built"], built.stderr
    wanted = kmodctl(root, "drivers", "-k", K113)
    assert wanted.returncode == 0, wanted.stderr
    assert wanted.stdout.splitlines() == [f"{device}: kmt_simple"]

    blacklist = root / "etc/modprobe.d/kmt.conf"
    blacklist.parent.mkdir(parents=True)
    blacklist.write_text("blacklist kmt_simple\n")
    refused = kmodctl(root, "drivers", "-k", K113)
    assert refused.stdout.splitlines() == [f"{device}: (none: blacklisted, or loaded already)"], (
        refused.stderr
    )
