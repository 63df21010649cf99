"""Which installed drivers present devices want: real modules' aliases, real udev."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kmodd import devices, modfile
from kmodd.paths import Root
from tests.conftest import K113, require


def test_a_device_wants_the_driver_whose_alias_matches() -> None:
    e1000 = sorted(
        Path(f"/lib/modules/{K113}/kernel/drivers/net/ethernet/intel").rglob("e1000.ko*")
    )
    require(f"e1000.ko* under /lib/modules/{K113} (package linux-image-{K113})", bool(e1000))
    info = modfile.read(e1000[0])
    assert "pci:v00008086d0000100Esv*sd*bc*sc*i*" in info.aliases
    present = ["pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00", "acpi:LNXSYSTM:"]
    assert devices.wanted([info], present) == ["e1000"]
    assert devices.wanted([info], ["pci:v000010ECd00008139sv0sd0bc02sc00i00"]) == []


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
    assert devices.is_loaded(Root.at(tmp_path), "kmt-simple")
    assert not devices.is_loaded(Root.at(tmp_path), "kmt_misc")
    assert devices.load_for_present_devices(Root.at(tmp_path), []) == []
