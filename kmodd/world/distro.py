"""What kmodd needs to know of each distribution, in one place per distribution.

A distribution is recognised by `ID` and `ID_LIKE` in the root's os-release. Its facts:
where DKMS installs built modules there (its `override_dest_module_location`: Debian,
Ubuntu and Arch `updates/dkms`, Fedora and RHEL `extra`, SUSE `updates`) and which
initrd generator it makes its initrds with. Anywhere else, DEST_MODULE_LOCATION decides
(but never inside the kernel's own `kernel/` tree) and the generator that is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmodd.base.paths import Root


@dataclass(frozen=True)
class Distribution:
    name: str
    ids: frozenset[str]
    """os-release IDs (ID or ID_LIKE) that mean this distribution."""
    module_dir: str | None
    """Where built modules go under lib/modules/KVER; None: DEST_MODULE_LOCATION."""
    initrd_generator: str | None
    """The generator (its command's name) its kernels' initrds are made with by
    default: tried first when several are installed."""


DEBIAN = Distribution(
    "debian",
    frozenset({"debian", "ubuntu", "linuxmint", "pop", "raspbian"}),
    "updates/dkms",
    "update-initramfs",
)
ARCH = Distribution("arch", frozenset({"arch", "manjaro", "endeavouros"}), "updates/dkms",
                    "mkinitcpio")  # fmt: skip
FEDORA = Distribution(
    "fedora",
    frozenset({"fedora", "rhel", "centos", "rocky", "almalinux", "ol"}),
    "extra",
    "dracut",
)
SUSE = Distribution(
    "suse", frozenset({"suse", "opensuse", "sles", "opensuse-leap", "opensuse-tumbleweed"}),
    "updates", "dracut",
)  # fmt: skip
OTHER = Distribution("other", frozenset(), None, None)
KNOWN = (DEBIAN, ARCH, FEDORA, SUSE)


def os_release_ids(root: Root) -> list[str]:
    """ID, then ID_LIKE's entries, of `<root>/etc/os-release` (or /usr/lib/os-release)."""
    for candidate in (root.real("/etc/os-release"), root.real("/usr/lib/os-release")):
        if candidate.is_file():
            fields = {}
            for line in candidate.read_text(errors="replace").splitlines()[:200]:
                key, _, value = line.partition("=")
                fields[key.strip()] = value.strip().strip("\"'")
            return [fields.get("ID", ""), *fields.get("ID_LIKE", "").split()]
    return []


def detect(root: Root) -> Distribution:
    """The distribution `root` is, by its own ID first, then the IDs it is like."""
    for os_id in os_release_ids(root):
        for distribution in KNOWN:
            if os_id in distribution.ids:
                return distribution
    return OTHER
